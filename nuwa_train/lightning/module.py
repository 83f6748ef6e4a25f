"""The LightningModule: LoRA fine-tuning of a HF VLM while Nüwa pruning is active in the forward pass.

Training uses soft (or straight-through) selection with an annealed temperature, so the model adapts to
its pruned anchors while gradients reach the selection scores; validation uses the hard path (tokens
physically dropped, `generate`) and reports retention against the same base model with all tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import lightning as L
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from ..data.schema import IGNORE_INDEX
from ..models import adapter_for, attach_nuwa, load_vlm
from ..pruning import NuwaConfig, NuwaConfigError
from ..pruning.soft import temperature_at
from ..schedules import warmup_cosine
from .checkpoints import FinalCheckpoint

# Enumerations as Literal types: LightningCLI rejects a misspelt value when it parses the recipe, naming the key
# and the allowed values; the checks in __post_init__ / __init__ say the same to Python callers.
LossReduction = Literal["token", "record"]
LoraTargets = Literal["lm", "lm+vision"]
SelectionMode = Literal["soft", "straight_through", "hard"]
TemperatureSchedule = Literal["exponential", "linear", "cosine"]
ModelDtype = Literal["float32", "bfloat16", "float16"]
ALL_TOKENS = "all"  # a training budget that keeps every vision token (model.train_budgets)
TrainBudget = int | Literal["all"]
LOSS_REDUCTIONS = get_args(LossReduction)


class NonFiniteTrainingError(RuntimeError):
    """Training reached a NaN / inf loss or weights: fit stops (a non-zero exit) before a checkpoint keeps them."""


NON_FINITE_ADVICE = "lower model.optimizer.lr, raise model.optimizer.warmup_steps or train in float32 (model.dtype)"


def check_choice(key: str, value: object, allowed: type) -> None:
    """`key=value` must be one of the Literal type's values; the error names the recipe key."""
    choices = get_args(allowed)
    if value not in choices:
        raise ValueError(f"{key}={value!r} must be one of {', '.join(choices)}")


def record_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged within each record, then over the records that have labels.

    The token mean (HF's default) weighs a record by its answer length, so a batch of one-word VQA
    answers and five-token boxes spends most of its gradient on the boxes; this weighs records equally.
    """
    targets = labels[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    labelled = counts > 0
    return (losses.sum(dim=1)[labelled] / counts[labelled]).mean()


@dataclass(frozen=True)
class LoraSettings:
    """Which weights adapt. Vision layers past the feature layer get no gradient and are never targeted."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: LoraTargets = "lm"
    train_projector: bool = True  # projector as a fully trained module (peft modules_to_save)

    def __post_init__(self):
        check_choice("model.lora.targets", self.targets, LoraTargets)


def lora_config(base, lora: LoraSettings) -> LoraConfig:
    """The peft config of `lora` for this HF model (its family's projection names)."""
    adapter = adapter_for(base)
    targets = adapter.lora_target_pattern(include_vision=lora.targets == "lm+vision")
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=[adapter.projector_name] if lora.train_projector else None,
    )


@dataclass(frozen=True)
class SelectionSettings:
    """How the pruner selects during training (validation and export always use "hard")."""

    mode: SelectionMode = "soft"
    temperature_start: float = 1.0
    temperature_end: float = 0.02
    anneal_steps: int = 200
    schedule: TemperatureSchedule = "exponential"
    gumbel: float = 0.0  # scale of Gumbel noise on the standardised scores (0 = off)
    hard_final_fraction: float = 0.0  # the last share of max_steps trains with physically dropped tokens

    def __post_init__(self):
        check_choice("model.selection.mode", self.mode, SelectionMode)
        check_choice("model.selection.schedule", self.schedule, TemperatureSchedule)


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # the cosine decays the learning rate to lr * min_lr_ratio at max_steps


def _training_settings(pruning: NuwaConfig, budgets: list | None, weights: list | None) -> dict:
    """model.train_budgets -> {budget: the NuwaConfig a step at that budget runs}, checked when the recipe loads
    together with model.train_budget_weights."""
    if budgets is None:
        if weights is not None:
            raise NuwaConfigError("model.train_budget_weights needs model.train_budgets (one weight per budget)")
        return {}
    if weights is not None and (len(weights) != len(budgets) or not all(math.isfinite(w) and w > 0 for w in weights)):
        raise NuwaConfigError(
            f"model.train_budget_weights={weights!r} must give one positive weight per budget of "
            f"model.train_budgets={budgets!r}"
        )
    if not budgets or len(set(budgets)) != len(budgets):
        raise NuwaConfigError(
            f"model.train_budgets={budgets!r} must list distinct budgets (vision tokens per image "
            f"on the 24x24 grid, or {ALL_TOKENS!r})"
        )
    settings = {}
    for budget in budgets:
        if budget == ALL_TOKENS:
            settings[budget] = NuwaConfig(method="none")
            continue
        try:
            settings[budget] = replace(pruning, budget=budget)
        except NuwaConfigError as error:
            raise NuwaConfigError(f"model.train_budgets: {error}") from None
    return settings


def resolve_model_path(model_path: str) -> str:
    """An existing local directory as an absolute path; anything else is returned as given (load_vlm explains)."""
    path = Path(model_path).expanduser()
    return str(path.resolve()) if path.is_dir() else model_path


class NuwaFineTuner(L.LightningModule):
    """LoRA + Nüwa pruning in the loop. `model_path` is a HF directory (the shipped tiny base by default).

    `eval_records`: the validation records scored with `generate` at each validation (a cap keeps it cheap);
    `test_records`: those `test` scores (None: the whole test split). `eval_max_new_tokens`: None lets the
    box format decide (a LLaVA box is ~25 tokens, a cap of 8 or 16 would cut every grounding answer).
    `train_budgets`: budget-robust fine-tuning — each step trains at a budget drawn from this list ("all": every
    vision token), so one adapted model serves any of them; validation and export use `pruning.budget`.
    `train_budget_weights`: relative draw weights, one per budget (None: uniform), so the budgets that are hardest
    to serve (the smallest) can get more of the steps.
    """

    def __init__(
        self,
        model_path: str = "data/tiny_base",
        pruning: NuwaConfig = NuwaConfig(),
        lora: LoraSettings = LoraSettings(),
        selection: SelectionSettings = SelectionSettings(),
        optimizer: OptimizerSettings = OptimizerSettings(),
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
        dtype: ModelDtype = "float32",
        eval_records: int = 64,
        eval_max_new_tokens: int | None = None,
        gradient_checkpointing: bool = False,
        test_records: int | None = None,
        loss_reduction: LossReduction = "token",
        train_budgets: list[TrainBudget] | None = None,
        train_budget_weights: list[float] | None = None,
    ):
        super().__init__()
        check_choice("model.loss_reduction", loss_reduction, LossReduction)
        check_choice("model.dtype", dtype, ModelDtype)
        self.training_settings = _training_settings(pruning, train_budgets, train_budget_weights)
        # Stored resolved, so an export or resume from another working directory finds the same base model.
        model_path = resolve_model_path(model_path)
        self.save_hyperparameters()
        self.pruning, self.lora, self.selection, self.optim = pruning, lora, selection, optimizer
        self.model = None  # built in configure_model, so sharded strategies can place it
        self.processor = None
        self.nuwa = None
        self.samples_seen = 0  # data position, saved in checkpoints for exact resume
        self.full_token_reference: dict | None = None  # base model, all tokens, on the validation subset
        self.checkpoint_progress: tuple | None = None  # (step, max_steps) of the checkpoint loaded: what exports record

    # ------------------------------------------------------------------------------- model
    def setup(self, stage: str) -> None:
        # Keep probabilities near 0 put subnormal floats into attention's backward, which CPUs run
        # ~10x slower (measured: 3.3 s vs 0.3 s per straight-through step); flush them to zero.
        torch.set_flush_denormal(True)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        base, self.processor = load_vlm(self.hparams.model_path, self.hparams.dtype)
        if self.hparams.gradient_checkpointing:
            # Non-reentrant: the soft keep bias reaches every layer inside its attention mask, a keyword argument,
            # and reentrant checkpointing passes no gradient to keyword arguments. transformers checkpoints
            # `forward`, not `__call__`, so the Nüwa layer hooks run once and the recompute reuses their masks.
            base.activation_checkpointing_enable({"use_reentrant": False})
        self.model = get_peft_model(base.train(), lora_config(base, self.lora))
        self.nuwa = attach_nuwa(self.model, self.pruning)
        self._check_training_budgets()

    def _check_training_budgets(self) -> None:
        """Every model.train_budgets entry must plan on this model's image grid; checked when the model is built,
        since a step that drew an impossible budget would otherwise fail mid-run, long after start."""
        adapter = self.nuwa.adapter
        for budget, settings in self.training_settings.items():
            grid = adapter.grid or settings.reference_grid  # dynamic-resolution models: the reference grid
            try:
                settings.plan(grid, self.nuwa.num_layers)
            except NuwaConfigError as error:
                reference = settings.reference_grid
                raise NuwaConfigError(
                    f"model.train_budgets: {budget} cannot be trained on this model's {grid[0]}x{grid[1]} grid "
                    f"({grid[0] * grid[1]} vision tokens per image; budgets count tokens per image on the "
                    f"{reference[0]}x{reference[1]} reference grid): {error}. Lower it, or use {ALL_TOKENS!r} to "
                    f"train with every token"
                ) from None

    @property
    def base_model(self):
        """The HF model with LoRA layers injected (what generate/evaluate run on)."""
        return self.model.get_base_model()

    # ------------------------------------------------------------------------------- schedule
    def temperature(self, step: int | None = None) -> float:
        s = self.selection
        return temperature_at(
            self.global_step if step is None else step,
            s.temperature_start,
            s.temperature_end,
            s.anneal_steps,
            s.schedule,
        )

    def selection_mode(self, step: int | None = None) -> str:
        step = self.global_step if step is None else step
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if max_steps > 0 and step >= max_steps * (1 - self.selection.hard_final_fraction):
            return "hard"
        return self.selection.mode

    # ------------------------------------------------------------------------------- training
    def step_budget(self, step: int | None = None) -> TrainBudget | None:
        """The budget a step trains at (None: `pruning.budget` always). Drawn from the step index alone, so every
        rank and a resumed run draw the same one."""
        if not self.training_settings:
            return None
        step = self.global_step if step is None else step
        draw = random.Random(f"train_budgets:{self.pruning.seed}:{step}")
        budgets, weights = list(self.training_settings), self.hparams.get("train_budget_weights")
        # `choice` for uniform draws keeps the budgets of runs recorded before weights existed.
        return draw.choice(budgets) if weights is None else draw.choices(budgets, weights)[0]

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        budget = self.step_budget()
        if budget is not None:
            self.nuwa.use(self.training_settings[budget])
        mode, temperature = self.selection_mode(), self.temperature()
        self.nuwa.set_selection(mode, temperature, self.selection.gumbel)
        size, has_images = batch["input_ids"].shape[0], batch.get("pixel_values") is not None
        batch = self._with_blank_image(batch)
        output = self.model(**batch)
        loss = lm_loss = self._lm_loss(output)
        if self.hparams.distill_weight > 0:
            distill = self._distillation(batch, output.logits)
            loss = lm_loss + self.hparams.distill_weight * distill
            self.log("train/distill_loss", distill, batch_size=size)
        self._stop_on_non_finite(loss)
        self.samples_seen += size * self.trainer.world_size
        # The losses are averaged over ranks, so rank 0's logs describe the whole global batch.
        self.log_dict({"train/loss": loss, "train/lm_loss": lm_loss}, prog_bar=True, batch_size=size, sync_dist=True)
        self.log_dict({"train/temperature": temperature, "train/hard": float(mode == "hard")}, batch_size=size)
        if has_images:
            self.log_dict(self._kept_tokens(), batch_size=size)
        return loss

    def _stop_on_non_finite(self, loss: torch.Tensor) -> None:
        """A NaN / inf loss stops fit before its backward pass: its update would make the weights non-finite and the
        next save would keep them. Every rank decides together (stop if any rank's loss is), so DDP ranks stop at the
        same step instead of one waiting for the others forever."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.trainer.strategy.reduce_boolean_decision(not finite, all=False):
            where = "on another rank" if finite else f"train/loss {loss.item():g} on global rank {self.global_rank}"
            raise NonFiniteTrainingError(
                f"the training loss is not finite at step {self.global_step + 1} ({where}): fit stopped before that "
                f"step's update and saved nothing after it, so last.ckpt holds the last saved step; "
                f"{NON_FINITE_ADVICE}"
            )

    def _lm_loss(self, output) -> torch.Tensor:
        """The answer loss of the last forward, reduced as `loss_reduction` says."""
        if self.hparams.loss_reduction == "record":
            return record_mean_loss(output.logits, self.nuwa.output_labels())
        return output.loss

    def _with_blank_image(self, batch: dict) -> dict:
        """A batch without images gets one extra row holding only a blank image: attended, but without labels.

        Data-parallel training needs every rank to run the same modules in every step: DDP fails on parameters
        "not used in producing the loss", and under ZeRO-3 every module call gathers its weights collectively, so a
        rank that skipped the vision tower or Nüwa's stage-2 scoring would leave the others waiting forever. The
        extra row takes exactly the image path (its gradients are zero) and leaves the other rows' loss unchanged:
        they are only widened by masked padding on the right.
        """
        if batch.get("pixel_values") is not None:
            return batch
        input_ids = batch["input_ids"]
        image_tokens, image_inputs = self.nuwa.adapter.blank_image(input_ids.device)
        length = max(input_ids.shape[1], image_tokens)
        pad_id = self.processor.tokenizer.pad_token_id
        row = torch.full((1, length), pad_id, dtype=input_ids.dtype, device=input_ids.device)
        row[:, :image_tokens] = self.nuwa.adapter.image_token_id
        row_mask = (row != pad_id).to(batch["attention_mask"].dtype)

        def widened(values: torch.Tensor, fill: int, extra: torch.Tensor) -> torch.Tensor:
            return torch.cat([F.pad(values, (0, length - values.shape[1]), value=fill), extra])

        extended = {
            **batch,
            **image_inputs,
            "input_ids": widened(input_ids, pad_id, row),
            "attention_mask": widened(batch["attention_mask"], 0, row_mask),
        }
        extended.update(self.nuwa.adapter.token_inputs(extended["input_ids"]))
        if batch.get("labels") is not None:
            extended["labels"] = widened(batch["labels"], IGNORE_INDEX, torch.full_like(row, IGNORE_INDEX))
        return extended

    def _kept_tokens(self) -> dict[str, float]:
        """Expected vision tokens per image after each stage (exact counts in hard mode)."""
        kept = self.nuwa.kept
        images = float(kept.images_per_sample.sum().clamp(min=1))
        logged = {"train/kept_stage1": float(kept.stage1_vision_tokens()) / images}
        stage2 = kept.stage2_vision_tokens()
        if stage2 is not None:
            logged["train/kept_stage2"] = float(stage2) / images
        # what the LLM's cost follows, comparable across methods (FastV has no stage 1, Nüwa two stages)
        logged["train/vision_tokens_per_layer"] = float(kept.vision_tokens_per_layer().mean()) / images
        return logged

    def _distillation(self, batch: dict, student_logits: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) on answer tokens; the teacher is this model, adapters off, no pruning."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad(), self.model.disable_adapter(), self.nuwa.paused():
            teacher_logits = self.model(**inputs).logits
        token_map = self.nuwa.kept.token_map()  # student position -> unpruned position
        labels = batch["labels"]
        predicts_answer = torch.zeros_like(labels, dtype=torch.bool)
        predicts_answer[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # the logit at t predicts token t + 1
        rows, cols = (predicts_answer.gather(1, token_map.clamp(min=0)) & (token_map >= 0)).nonzero(as_tuple=True)
        student = student_logits[rows, cols].float() / self.hparams.distill_temperature
        teacher = teacher_logits[rows, token_map[rows, cols]].float() / self.hparams.distill_temperature
        return (
            F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
            * self.hparams.distill_temperature**2
        )

    # ------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_index: int) -> None:
        if self.training_settings:  # the last step's budget is a draw; validation runs the recipe's own
            self.nuwa.use(self.pruning)
        self.nuwa.set_selection("hard")
        output = self.model(**self._with_blank_image(batch))
        self.log(
            "val/loss", self._lm_loss(output), prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True
        )

    def on_validation_epoch_end(self) -> None:
        self._log_generation_metrics("val")

    def test_step(self, batch: dict, batch_index: int) -> None:
        self.nuwa.set_selection("hard")
        output = self.model(**self._with_blank_image(batch))
        self.log("test/loss", self._lm_loss(output), batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self._log_generation_metrics("test")

    def _log_generation_metrics(self, split: str) -> None:
        """Hard-path `generate` on a subset of the split: VQA / grounding and retention vs full tokens."""
        from ..evaluation import evaluate

        records = self._evaluation_records(split)
        if not records:
            return
        settings = dict(progress=False, max_new_tokens=self.hparams.eval_max_new_tokens)
        if self.full_token_reference is None or (
            self.full_token_reference.get("split"),
            self.full_token_reference.get("records"),
        ) != (split, len(records)):
            with self.model.disable_adapter(), self.nuwa.paused():
                reference = evaluate(self.base_model, self.processor, records, pruning=None, **settings)
            self.full_token_reference = {
                "split": split,
                "records": len(records),
                "vqa": reference.vqa_exact_match,
                "grounding": reference.grounding_acc50,
            }
        result = evaluate(self.base_model, self.processor, records, pruning=self.pruning, **settings)  # hard path
        metrics = {
            f"{split}/vqa_em": result.vqa_exact_match,
            f"{split}/grounding_acc50": result.grounding_acc50,
            f"{split}/grounding_miou": result.grounding_miou,
            f"{split}/vision_tokens": result.average_vision_tokens,
        }
        for task, key in (("vqa", f"{split}/vqa_em"), ("grounding", f"{split}/grounding_acc50")):
            full = self.full_token_reference[task]
            if metrics[key] is not None and full:
                metrics[f"{split}/{task}_retention"] = metrics[key] / full
        self.log_dict({k: float(v) for k, v in metrics.items() if v is not None}, sync_dist=True)

    def _evaluation_records(self, split: str) -> list:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "evaluation_records"):
            return []
        limit = self.hparams.test_records if split == "test" else self.hparams.eval_records
        return datamodule.evaluation_records(split, limit)

    # ------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        warmup = max(self.optim.warmup_steps, 1)
        total = max(self.trainer.max_steps, warmup + 1)

        def factor(step: int) -> float:
            return warmup_cosine(step, warmup, (step - warmup) / (total - warmup), self.optim.min_lr_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------- checkpoints
    def configure_callbacks(self):
        return [FinalCheckpoint()]  # last.ckpt is the final state; Ctrl-C / SIGTERM stop cleanly

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        checkpoint["nuwa_train"] = {
            "samples_seen": self.samples_seen,
            "pruning": self.pruning.to_dict(),
            "max_steps": max_steps,
            "full_token_reference": self.full_token_reference,
            "lora": asdict(self.lora),
            "torch_rng": torch.get_rng_state(),
        }
        # Only trainable weights go into the checkpoint: the base model is read from model_path.
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        self._refuse_non_finite_weights(checkpoint["state_dict"])

    def _refuse_non_finite_weights(self, state_dict: dict) -> None:
        """An update can overflow while its loss was finite: such weights are not saved (the save fails, last.ckpt
        keeps the previous state). Every rank holds the same weights under DDP, so all of them refuse alike."""
        non_finite = [
            name
            for name, value in state_dict.items()
            if value.is_floating_point() and not bool(torch.isfinite(value).all())
        ]
        if non_finite:
            raise NonFiniteTrainingError(
                f"the weights after step {self.global_step} are not finite ({len(non_finite)} of {len(state_dict)} "
                f"tensors, e.g. {non_finite[0]}): not saved, so last.ckpt holds the last saved step; "
                f"{NON_FINITE_ADVICE}"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("nuwa_train", {})
        self.samples_seen = state.get("samples_seen", 0)
        self.full_token_reference = state.get("full_token_reference")
        self.checkpoint_progress = (checkpoint.get("global_step"), state.get("max_steps"))
        if "torch_rng" in state:  # dropout / Gumbel draws continue as in an uninterrupted run
            torch.set_rng_state(state["torch_rng"])
        if "state_dict" not in checkpoint:  # a DeepSpeed checkpoint: the engine has restored the weights itself
            return
        self.configure_model()
        missing = set(self.state_dict()) - set(checkpoint["state_dict"])
        checkpoint["state_dict"] = {
            **{k: v for k, v in self.state_dict().items() if k in missing},
            **checkpoint["state_dict"],
        }
