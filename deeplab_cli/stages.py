"""The names of the pipeline's stages, one list for every report that times them.

`deeplab benchmark` times every stage on its own; `deeplab batch` (and `evaluate`, through its engine) times
preprocessing inside `network` and encoding inside `write`; `Segmenter.segment` times `network` and `crf`.
"""

from __future__ import annotations

STAGE_LABELS: dict[str, str] = {  # stage → what it covers, in pipeline order
    "decode": "decode",
    "preprocess": "preprocess + transfer",
    "network": "network",
    "upsample": "upsample + softmax",
    "crf": "CRF",
    "encode": "argmax + encode",
    "write": "encode + write",
}
BENCHMARK_STAGES: tuple[str, ...] = ("decode", "preprocess", "network", "upsample", "crf", "encode")
BATCH_STAGES: tuple[str, ...] = ("decode", "network", "upsample", "crf", "write")
