"""Calibration data: files -> named domains -> token windows; router hooks, routing maths,
statistics accumulators and MoE-block captures. Imports `io/` and `families/`, never `runtime/`.

    documents.py  a data source's documents, read lazily (text, JSONL, JSON, Parquet)
    data.py       --data sources -> tokenised domains of fixed-length windows, batches
    spec.py       DataSpec: the data options of every command as one frozen record
    hooks.py      router hooks that feed a Recorder, driven by the family record
    recorder.py   on-device accumulators of routing statistics per layer and domain
    routing.py    a family's top-k routing from router logits (also of a pruned layer)
    capture.py    what enters and leaves every MoE block (inputs, logits, outputs)
"""
