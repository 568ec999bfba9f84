"""``lorakit serve``: every model lorakit loads behind one OpenAI-compatible HTTP endpoint.

The engine (:mod:`.engine`) batches requests continuously, each row with its own adapter, weighted
combination or mixture; the HTTP layer (:mod:`.app`) speaks the OpenAI API on FastAPI + uvicorn.
"""
