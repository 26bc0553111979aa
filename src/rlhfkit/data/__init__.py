"""Record types, JSONL and `datasets` I/O, importers, rankings → pairs."""

from rlhfkit.data.io import (
    DataError,
    from_dataset,
    read_records,
    to_dataset,
    write_records,
)
from rlhfkit.data.pairs import CONSENSUS, borda, group_by_prompt, rankings_to_pairs
from rlhfkit.data.records import (
    Completion,
    Message,
    PreferencePair,
    Prompt,
    Ranking,
    SamplingParams,
)

__all__ = [
    "CONSENSUS",
    "Completion",
    "DataError",
    "Message",
    "PreferencePair",
    "Prompt",
    "Ranking",
    "SamplingParams",
    "borda",
    "from_dataset",
    "group_by_prompt",
    "rankings_to_pairs",
    "read_records",
    "to_dataset",
    "write_records",
]
