"""Letter-level string tasks: reversing a word, capitalising words, counting a letter."""

from __future__ import annotations

import random

from lorakit.data.tasks.base import Task

CONSONANTS = "bcdfghklmnprstvz"
VOWELS = "aeiou"
#: Common short words for phrases to capitalise.
WORDS = tuple(dict.fromkeys(
    """the a of and to in is it that was for on are with as his they be at one have this from or
    had by hot word but what some we can out other were all there when up use your how said an
    each she which do their time if will way about many then them write would like so these her
    long make thing see him two has look more day could go come did number sound no most people my
    over know water than call first who may down side been now find any new work part take get
    place made live where after back little only round man year came show every good me give our
    under name very through just form great think say help low line before turn cause same mean
    differ move right boy old too does tell sentence set three want air well also play small end
    put home read hand port large spell add even land here must big high such follow act why ask
    men change went light kind off need house picture try us again animal point mother world near
    build self earth father head stand own page should country found answer school grow study still
    learn plant cover food sun four thought let keep eye never last door between city tree cross
    since hard start might story saw far sea draw left late run while press close night real life
    few stop open seem together next white children begin got walk example ease paper often always
    music those both mark book letter until mile river car feet care second group carry took rain
    eat room friend began idea fish mountain north once base hear horse cut sure watch color face
    wood main enough plain girl usual young ready above ever red list though feel talk bird soon
    body dog family direct pose leave song measure state product black short numeral class wind
    question happen complete ship area half rock order fire south problem piece told knew pass farm
    top whole king size heard best hour better true during hundred am remember step early hold west
    ground interest reach fast five sing listen six table travel less morning ten simple several
    vowel toward war lay against pattern slow center love person money serve appear road map science
    rule govern pull cold notice voice fall power town fine certain fly unit lead cry dark machine
    note wait plan figure star box noun field rest correct able pound done beauty drive stood
    contain front teach week final gave green oh quick develop sleep warm free minute strong special
    mind behind clear tail produce fact street inch lot nothing course stay wheel full force blue
    object decide surface deep moon island foot yet busy test record boat common gold possible
    plane age dry wonder laugh thousand ago ran check game shape yes cool miss brought heat snow bed
    bring sit perhaps fill east weight language among""".split()
))


def pseudo_word(generator: random.Random, syllables: int) -> str:
    """A pronounceable made-up word of consonant-vowel syllables."""
    return "".join(generator.choice(CONSONANTS) + generator.choice(VOWELS) for _ in range(syllables))


def _reverse(generator: random.Random) -> tuple[str, str]:
    """A made-up word of 2 to 4 syllables; the answer is its letters in reverse order."""
    word = pseudo_word(generator, generator.randint(2, 4))
    return f"Reverse the letters of the word: {word}", word[::-1]


def _caps(generator: random.Random) -> tuple[str, str]:
    """A phrase of 3 to 5 lowercase words; the answer capitalises the first letter of each."""
    words = [generator.choice(WORDS) for _ in range(generator.randint(3, 5))]
    phrase = " ".join(words)
    answer = " ".join(word[:1].upper() + word[1:] for word in words)
    return f"Capitalise the first letter of every word: {phrase}", answer


def _count(generator: random.Random) -> tuple[str, str]:
    """A string of 6 to 12 letters holding a chosen letter 0 to 4 times; the answer is that count."""
    letter = generator.choice(VOWELS + CONSONANTS)
    others = [c for c in VOWELS + CONSONANTS if c != letter]
    times = generator.randint(0, 4)
    letters = [letter] * times + [generator.choice(others) for _ in range(generator.randint(6, 12) - times)]
    generator.shuffle(letters)
    text = "".join(letters)
    return f"Count how many times the letter {letter} appears in: {text}", str(times)


REVERSE = Task(name="reverse", description="Reverse the letters of a made-up word.", generate=_reverse)
CAPS = Task(name="caps", description="Capitalise the first letter of every word of a phrase.", generate=_caps)
COUNT = Task(
    name="count", description="Count how often a letter appears in a string of letters.", generate=_count
)
