"""Iterating a records dataset ends after its len() rows, although indexing it past the end still answers (FileRecords
wraps an index around to stand in for a skipped record; the sampler relies on it)."""

import itertools
import json

from PIL import Image

from nuwa_train.data.records import FileRecords, SyntheticRecords
from nuwa_train.data.synthetic import SyntheticConfig

EXTRA = 5  # rows asked for beyond the end: an endless iteration yields them, a bounded one does not


def _rows(data) -> list[dict]:
    return list(itertools.islice(iter(data), len(data) + EXTRA))


def test_file_records_iterate_once_over_their_rows_and_indexing_still_wraps(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (30, 60, 90)).save(tmp_path / "images" / "a.png")
    records = [
        {
            "id": f"r{i}",
            "images": ["images/a.png"],
            "messages": [
                {"role": "user", "content": f"<image>question {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ],
        }
        for i in range(3)
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    data = FileRecords([], [], "raise", sharegpt_files=[str(path)])

    assert [row["id"] for row in _rows(data)] == ["r0", "r1", "r2"]
    assert [row["id"] for row in data] == ["r0", "r1", "r2"]  # a plain for loop ends too
    assert data[len(data)]["id"] == "r0" and data[len(data) + 1]["id"] == "r1"  # the wrap-around is kept


def test_synthetic_records_iterate_once_over_their_rows():
    data = SyntheticRecords(SyntheticConfig(), "train", 2, vqa_per_image=2, grounding_per_image=1)
    rows = _rows(data)
    assert len(rows) == len(data) == 6
    assert [row["id"] for row in rows] == [data[index]["id"] for index in range(len(data))]
