"""Data start-up: seconds from building the data module on a large user file to the first training step."""

from __future__ import annotations

import json
import time
from pathlib import Path


def write_startup_dataset(out_dir: Path, records: int) -> Path:
    """A LLaVA file of `records` VQA records, each with its own (small) image file, as a large user dataset has."""
    import io

    from PIL import Image

    from ..data.formats import IMAGE_DIR, IMAGE_TOKEN, LLAVA_FILE

    images = out_dir / IMAGE_DIR
    images.mkdir(parents=True, exist_ok=True)
    encoded = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 40, 40)).save(encoded, "PNG")
    rows = []
    for i in range(records):
        name = f"{IMAGE_DIR}/{i:07d}.png"
        (out_dir / name).write_bytes(encoded.getvalue())
        rows.append(
            {
                "id": f"r{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\nwhat colour is the square ?"},
                    {"from": "gpt", "value": "red"},
                ],
            }
        )
    (out_dir / LLAVA_FILE).write_text(json.dumps(rows))
    return out_dir / LLAVA_FILE


def time_data_startup(model_path: str, llava_file: Path, batch_size: int = 16) -> dict:
    """Seconds from building the data module to the first training step of a real `fit` on a user file."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from ..lightning import NuwaDataModule, NuwaFineTuner

    marks = {}

    class FirstStep(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_index):
            marks["first_step"] = time.perf_counter()

    started = time.perf_counter()
    data = NuwaDataModule(processor_path=model_path, train_files={"llava": [str(llava_file)]}, batch_size=batch_size)
    records = len(data.dataset("train"))
    marks["records_loaded"] = time.perf_counter()
    module = NuwaFineTuner(model_path=model_path)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[FirstStep()],
        default_root_dir=str(llava_file.parent / "run"),
    )
    trainer.fit(module, data)
    return {
        "records": records,
        "load_seconds": round(marks["records_loaded"] - started, 2),
        "first_step_seconds": round(marks["first_step"] - started, 2),
    }
