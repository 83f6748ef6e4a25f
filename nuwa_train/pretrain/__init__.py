"""Pre-training of the tiny base VLM ("the pretrained VLM" of this project) from scratch, on Lightning.

    nuwa-train pretrain-base recipes/tiny_base.yaml [--model.key value ...] [--fresh] [--export-only]
    python -m nuwa_train.pretrain recipes/tiny_base.yaml ...            (the same)

- `module.TinyBasePretrainer`: the LightningModule (model, auxiliary heads, the run's `Position` in its phases);
- `data.TinyBaseData`: batches generated from the position when the step asks (exact resume by construction);
- `phases`: `Phase` settings, `Position`, the learning-rate schedule; `targets` / `heads`: the auxiliary targets
  and heads (dropped at export);
- `callbacks`: `PhaseClock` (phase ends, time budgets), `CpuThreads` (adaptive thread count), `ExportBase`;
- `state`: safetensors checkpoints, the CSV log across sessions, the conversion of pre-Lightning states;
- `export`: the export directory with its eval report and README; `cli`: the command line.
"""

from .module import TinyBasePretrainer
from .phases import Phase, Position

__all__ = ["Phase", "Position", "TinyBasePretrainer"]
