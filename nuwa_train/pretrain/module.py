"""The LightningModule that pre-trains the tiny base VLM (from scratch, or from an earlier base: `init_from`),
with all vision tokens.

- Phase "vision" (CLIP-like): the vision tower alone learns linear auxiliary heads on the feature-layer
  tokens: per-patch (size, colour, shape) class or background, per-patch box of the covering object
  (4 x bins classes), per-patch global counts (all / per colour / per shape), and a multi-label
  "which objects are present" head on the CLS token. The CLS head is what makes CLS attention a saliency
  map, as the pruners assume (real CLIP gets this from its contrastive objective).
- Phase "all": everything trains on the answer loss (mean per sample) plus the auxiliary losses, plus a
  "referred object" head on the LLM's hidden states of the vision tokens at one layer (which patches belong
  to the objects the prompt is about, `Record.referred`), teaching the LLM to bind words to patches (only when the
  question comes before the image). A phase may ask some images as multi-turn conversations: every answer is
  supervised and weighs as much as a single-turn record's answer.
- Vision position embeddings start from a 2-D sin-cos table (scaled), then are learned.

The module owns the run's `Position` (phase, steps, data position, phase seconds): the learning rate, the
trainable part and the batch follow from it, and `PhaseClock` advances it after every step.
"""

from __future__ import annotations

import itertools
import warnings
from collections import defaultdict
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch

from ..data.synthetic import SyntheticConfig, coordinate_tokens, vocabulary
from ..lightning.data import as_synthetic_config
from ..models.tiny import TinyLlavaSpec, build_tiny_llava
from .callbacks import PhaseClock
from .data import phase_synthetic
from .heads import (
    AuxHeads,
    answer_losses,
    answer_queries,
    cls_attention_pool,
    init_vision_positions,
    retrieval_loss,
)
from .init import load_initial_weights
from .phases import Phase, Position, as_phase, lr_at
from .state import STATE_KEY
from .targets import COVER_THRESHOLD, TargetMaker

LATER_TURNS_METRIC = "lm_later_turns"  # the answer loss of conversation turns after the first
PresenceInput = Literal["cls", "cls_attention"]  # the CLS output, or the feature layer's CLS attention read-out
# The step fetches its own batch, once (see data.py): Lightning's warnings about that step signature do not apply.
for _message in (r".*`dataloader_iter` step flavor.*", r"Found `dataloader_iter` argument.*"):
    warnings.filterwarnings("ignore", message=_message)


def as_spec(value: TinyLlavaSpec | dict) -> TinyLlavaSpec:
    return value if isinstance(value, TinyLlavaSpec) else TinyLlavaSpec(**value)


class TinyBasePretrainer(L.LightningModule):
    """`spec`: the model's sizes; `phases`: what trains when (see `Phase`); `synthetic`: the training data
    (linked from `data.synthetic` by the CLI), which also fixes the vocabulary and the heads' classes;
    `init_from`: an exported base directory or a run's state file to start from (see `init.py`);
    `retrieval_layer` / `retrieval_head`: the LLM attention head a phase's `retrieval_weight` supervises (default:
    head 0 of the middle layer)."""

    def __init__(
        self,
        phases: list[Phase],
        spec: TinyLlavaSpec = TinyLlavaSpec(),
        synthetic: SyntheticConfig = SyntheticConfig(),
        seed: int = 0,
        position_init_scale: float = 0.5,
        presence_from: PresenceInput = "cls",
        referred_layer: int = 2,
        referred_pos_weight: float = 4.0,
        weight_decay: float = 0.01,
        adam_betas: tuple[float, float] = (0.9, 0.98),
        init_from: str | None = None,
        retrieval_layer: int | None = None,
        retrieval_head: int = 0,
    ):
        super().__init__()
        if presence_from not in ("cls", "cls_attention"):
            raise ValueError(f"model.presence_from={presence_from!r} must be one of cls, cls_attention")
        self.phases = [as_phase(p) for p in phases]
        if not self.phases:
            raise ValueError("model.phases: a recipe needs at least one phase")
        self.spec, self.synthetic = as_spec(spec), as_synthetic_config(synthetic)
        self._check_phase_data()
        self._check_referred()
        if retrieval_layer is None:  # the middle of the LLM: its input has read the question, and layers are left
            retrieval_layer = self.spec.text_layers // 2
        if not 0 <= retrieval_layer < self.spec.text_layers or not 0 <= retrieval_head < self.spec.text_heads:
            raise ValueError(
                f"model.retrieval_layer={retrieval_layer} / model.retrieval_head={retrieval_head} must "
                f"name a layer < {self.spec.text_layers} and a head < {self.spec.text_heads} of the LLM"
            )
        self.retrieval_layer, self.retrieval_head = retrieval_layer, retrieval_head
        self.presence_from, self.referred_layer = presence_from, referred_layer
        self.weight_decay, self.adam_betas = weight_decay, tuple(adam_betas)
        self.save_hyperparameters(
            {
                "phases": [asdict(p) for p in self.phases],
                "spec": asdict(self.spec),
                "synthetic": asdict(self.synthetic),
                "seed": seed,
                "position_init_scale": position_init_scale,
                "presence_from": presence_from,
                "referred_layer": referred_layer,
                "referred_pos_weight": referred_pos_weight,
                "weight_decay": weight_decay,
                "adam_betas": list(self.adam_betas),
                "init_from": init_from,
                "retrieval_layer": retrieval_layer,
                "retrieval_head": retrieval_head,
            }
        )
        torch.manual_seed(seed)  # the initial weights are a function of the recipe
        self.model, self.processor = build_tiny_llava(
            self.spec, vocabulary(self.synthetic), coordinate_tokens(self.synthetic)
        )
        init_vision_positions(self.model, self.spec, position_init_scale)
        self.model.train()  # built in eval mode; Lightning keeps each module's mode
        self.targets = TargetMaker(self.synthetic, self.spec)
        self.heads = AuxHeads(self.spec.vision_hidden, self.spec.text_hidden, self.targets, referred_pos_weight)
        if init_from is not None:  # a resumed run then loads its own state over these weights
            print(load_initial_weights(self, init_from).summary(), flush=True)
        self.vision_params = set(self.model.model.vision_tower.parameters()) | {
            p for n, p in self.heads.named_parameters() if not n.startswith("referred")
        }
        self.position = Position()
        self.elapsed = 0.0  # training seconds over all sessions
        self.window: dict[str, list[float]] = defaultdict(list)  # metrics since the last log row

    def _check_phase_data(self) -> None:
        """Fail when the recipe is read, not when a later phase starts hours into a run."""
        for index, phase in enumerate(self.phases):
            try:
                phase_synthetic(self.synthetic, phase)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"model.phases.{index} ({phase.name!r}): bad data override {phase.data}: {error}"
                ) from None

    def _check_referred(self) -> None:
        """The referred head asks the LLM's vision tokens which patches the question is about: they can know only
        when the question comes before the image."""
        for index, phase in enumerate(self.phases):
            if phase.referred_weight > 0 and not self.spec.image_after_text:
                raise ValueError(
                    f"model.phases.{index} ({phase.name!r}): referred_weight={phase.referred_weight} "
                    f"needs model.spec.image_after_text: true (with the image first its tokens cannot "
                    f"see the question); set referred_weight: 0"
                )

    # ------------------------------------------------------------------------------- where the run is
    @property
    def finished(self) -> bool:
        return self.position.phase >= len(self.phases)

    @property
    def phase(self) -> Phase:
        return self.phases[self.position.phase]

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def phase_steps(self) -> dict[str, int]:
        """Steps realised per phase so far (time-budgeted phases: re-run with these steps to reproduce)."""
        done = dict(zip([p.name for p in self.phases], self.position.done_steps))
        if not self.finished:
            done[self.phase.name] = self.position.inner
        return done

    def skip_finished_phases(self) -> None:
        while not self.finished and self.position.phase_done(self.phase):
            self.position = self.position.next_phase()

    def step_done(self, seconds: float, metrics: dict) -> dict | None:
        """Advance the position past the step just taken; returns the log row when one is due."""
        phase = self.phase
        self.position = self.position.after_step(phase, seconds)
        self.elapsed += seconds
        self.skip_finished_phases()
        for key, value in metrics.items():
            self.window[key] += value if isinstance(value, list) else [value]
        if self.position.step % self.trainer.log_every_n_steps and not self.finished:
            return None
        row = {"phase": phase.name, "elapsed_s": round(self.elapsed, 1)}
        row.update({key: round(sum(v) / len(v), 5) for key, v in sorted(self.window.items())})
        self.window.clear()
        return row

    # ------------------------------------------------------------------------------- one step
    def training_step(self, dataloader_iter):
        """One optimizer step on the batch of the current position (made now: see `data.py`)."""
        batch, _, _ = next(dataloader_iter)
        phase = self.phase
        lr = lr_at(phase, self.position)
        for group in self.optimizers().param_groups:
            group["lr"] = lr
        vision_only = phase.train == "vision"
        for param in itertools.chain(self.model.parameters(), self.heads.parameters()):
            param.requires_grad_(not vision_only or param in self.vision_params)
        feature_layer = self.spec.vision_feature_layer
        tower = self.model.model.vision_tower
        hidden = tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        features = hidden[feature_layer]
        pooled = None
        if self.presence_from == "cls_attention":
            index = feature_layer % len(hidden)
            pooled = cls_attention_pool(tower.encoder.layers[index - 1], hidden[index - 1])
        parts = {f"aux_{k}": v for k, v in self.heads.vision_losses(features, batch, pooled).items()}
        total = phase.aux_weight * sum(parts.values())
        per_answer = None
        if not vision_only:
            ids = batch["input_ids"]
            is_image = ids == self.model.config.image_token_index
            image_features = self.model.model.multi_modal_projector(features[batch["image_of_record"], 1:])
            embeds = self.model.get_input_embeddings()(ids.masked_fill(is_image, 0))
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeds.dtype))
            language_model = self.model.model.language_model
            out = language_model(
                inputs_embeds=embeds,
                attention_mask=batch["attention_mask"],
                output_hidden_states=phase.referred_weight > 0 or phase.retrieval_weight > 0,
            )
            per_answer = answer_losses(self.model.lm_head(out.last_hidden_state), batch["labels"])
            if len(per_answer) != len(batch["kinds"]):
                raise RuntimeError(
                    f"the batch has {len(per_answer)} labelled answers for {len(batch['kinds'])} "
                    f"questions asked: an answer was cut or two answers were joined"
                )
            parts["lm"] = per_answer.mean()
            total = total + phase.lm_weight * parts["lm"]
            if phase.referred_weight > 0:
                parts["referred"] = self.heads.referred_loss(
                    out.hidden_states[self.referred_layer], is_image, batch["referred"]
                )
                total = total + phase.referred_weight * parts["referred"]
            if phase.retrieval_weight > 0:
                parts["retrieval"] = self._retrieval_loss(language_model, out.hidden_states, embeds, is_image, batch)
                total = total + phase.retrieval_weight * parts["retrieval"]
        self.log(
            "loss",
            total.detach(),
            prog_bar=True,
            logger=False,  # log.csv gets the window means (PhaseClock)
            batch_size=phase.batch_size,
        )
        metrics = {k: float(v.detach()) for k, v in parts.items()}
        metrics.update(lr=lr, loss=float(total.detach()), threads=torch.get_num_threads())
        if per_answer is not None:
            for kind, turn, value in zip(batch["kinds"], batch["turn_index"], per_answer.tolist()):
                metrics.setdefault(f"lm_{kind}", []).append(value)
                if turn:  # answers after a conversation's first turn (the first turn is a single question)
                    metrics.setdefault(LATER_TURNS_METRIC, []).append(value)
        return {"loss": total, "metrics": metrics}

    def _retrieval_loss(self, language_model, hidden_states, embeds, is_image, batch) -> torch.Tensor:
        """`heads.retrieval_loss` at `retrieval_layer`: each answer's query token should attend to its objects."""
        rows, positions = answer_queries(batch["labels"])
        targets = torch.zeros(len(rows), is_image.shape[1], dtype=torch.bool, device=is_image.device)
        targets[is_image[rows]] = (batch["answer_referred"] >= COVER_THRESHOLD).reshape(-1)
        position_ids = torch.arange(is_image.shape[1], device=is_image.device)[None].expand(len(is_image), -1)
        rotary = language_model.rotary_emb(embeds, position_ids)  # the positions the model used (right padding)
        return retrieval_loss(
            language_model.layers[self.retrieval_layer],
            hidden_states[self.retrieval_layer],
            rotary,
            rows,
            positions,
            targets,
            self.retrieval_head,
        )

    def configure_optimizers(self):
        """AdamW over every weight (a phase freezes by requires_grad); no decay on biases, norms, embeddings."""
        decay, no_decay = [], []
        for name, param in itertools.chain(self.model.named_parameters(), self.heads.named_parameters()):
            (no_decay if param.ndim < 2 or "embed" in name else decay).append(param)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=0.0,
            betas=self.adam_betas,
        )

    def configure_callbacks(self):
        return [PhaseClock()]  # without it the position never advances

    # ------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[STATE_KEY] = {
            "position": asdict(self.position),
            "elapsed": self.elapsed,
            "torch_rng": torch.get_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint[STATE_KEY]
        self.position = Position(**state["position"])
        self.elapsed = state["elapsed"]
        torch.set_rng_state(state["torch_rng"])
