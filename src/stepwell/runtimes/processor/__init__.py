"""The processor runtime (Integray "Python processor" style).

A processor step's file is a *statement*: the body of an async function that
sees ``INPUT_DATA``, ``DATA_CHECKPOINT``, ``log`` and ``sleep`` and ends with
``return <list of objects>``. The statement runs in a worker process under a
restricted-Python policy (:mod:`.guard`); its results are checked against the
step's mandatory ``output_schema`` (:mod:`.schema`) and written to the output
table in Arrow batches (:mod:`.worker`). :mod:`.host` builds the worker's
``start`` message. See ``docs/processor.md`` for the user-facing contract.
"""
