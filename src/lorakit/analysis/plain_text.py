"""Plain English paragraphs the base model predicts well: the forgetting probe of the intruder study.

Written for lorakit (no download): common knowledge in plain prose. Each paragraph is scored as raw
text (no chat template): its first sentence is the prompt and the rest the supervised continuation.
"""

from __future__ import annotations

from lorakit.data.example import Example

PARAGRAPHS = (
    "The sun is the star at the centre of our solar system. It is a nearly perfect ball of hot plasma, and it "
    "provides the light and heat that make life on Earth possible.",
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure is lower, so "
    "water boils at a lower temperature and food takes longer to cook.",
    "Paris is the capital and largest city of France. It is known for the Eiffel Tower, the Louvre museum and "
    "its cafes, and millions of tourists visit it every year.",
    "The human heart pumps blood through the body. It has four chambers, two atria and two ventricles, and it "
    "beats about seventy times a minute when a person is at rest.",
    "A computer program is a list of instructions that a computer follows. Programmers write these instructions "
    "in programming languages such as Python, Java or C.",
    "Plants make their own food through photosynthesis. They use sunlight, water and carbon dioxide to produce "
    "sugar and release oxygen into the air.",
    "The Pacific Ocean is the largest and deepest ocean on Earth. It covers more than sixty million square miles "
    "and stretches from the Arctic in the north to Antarctica in the south.",
    "Exercise is good for both the body and the mind. Regular physical activity strengthens the heart, improves "
    "sleep and can reduce stress and anxiety.",
    "The moon orbits the Earth about once every twenty-seven days. Its gravity causes the tides, and its phases "
    "change as different parts of it are lit by the sun.",
    "Bread is made from flour, water, salt and yeast. The yeast produces gas that makes the dough rise, and "
    "baking turns the dough into a soft loaf with a golden crust.",
    "Libraries lend books to the people of a community. Many libraries also offer computers, quiet places to "
    "study and reading programs for children.",
    "The first airplane flight was made by the Wright brothers in 1903. Their aircraft stayed in the air for "
    "only twelve seconds, but it changed the history of travel.",
)


def plain_text_examples() -> list[Example]:
    """Each paragraph as (first sentence, rest) for a raw-text loss."""
    examples = []
    for paragraph in PARAGRAPHS:
        first, _, rest = paragraph.partition(". ")
        examples.append(Example(prompt=first + ".", completion=" " + rest))
    return examples
