"""`nuwa-train fit|validate|test --config recipes/<name>.yaml [--section.key value ...]` (LightningCLI)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from .data import NuwaDataModule
from .module import NuwaFineTuner


class NuwaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data module tokenises with the processor stored next to the model.
        parser.link_arguments("model.model_path", "data.processor_path")


def run(argv: list[str]) -> None:
    NuwaCLI(NuwaFineTuner, NuwaDataModule, args=argv, save_config_kwargs={"overwrite": True})
