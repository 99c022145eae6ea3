"""``hwft board``: a local web UI over the same recipe, runs and results as the CLI.

It builds recipes from the schema, offering only what the chosen backend's capability record
allows (:mod:`hwft.board.form`); previews the data as ``hwft data inspect`` does; starts, stops
and resumes ``hwft train`` runs and charts their metrics as they grow (:mod:`hwft.board.runs`,
:mod:`hwft.board.charts`); compares runs and ``hwft bench`` results of any machines; and chats
with, evaluates and exports a result. The HTTP side is a Starlette app served by uvicorn
(:mod:`hwft.board.app`), the page plain HTML and JavaScript (``static/``) with no build step.
"""
