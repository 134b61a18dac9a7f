"""The training loop: token-budget batches, Adam (as AdamW) + warmup, label smoothing, ClearML tracking.

Every run is a ClearML experiment (``Task.init``): hyperparameters are connected (editable in
the UI, so a cloned task re-runs with new values), scalars and attention heatmaps are reported,
and every saved checkpoint is registered as a version in the model registry, tagged
``candidate``, together with its ONNX export (``train.export_onnx``, on by default): at each save
the checkpoint is exported (:func:`stepwise.export.export_checkpoint`, parity-checked against
PyTorch on validation sentences) into ``OUTPUT_DIR/exports/<checkpoint name>/`` and registered from
this run's task as a version of ``<name>-onnx`` linked to the checkpoint's version
(:func:`stepwise.registry.client.register_export`), so every version training registers can be
served without torch. The export is off the training clock (:meth:`TrainingClock.paused`): a
time budget buys the same training steps with or without it. A save whose export fails (parity
or otherwise) is logged and not registered at all, so no registered version lacks its export; the
checkpoint stays on disk. ``torchrun --nproc_per_node N -m stepwise.train`` trains data-parallel (DDP; gloo on CPU,
NCCL on GPU); rank 0 alone logs, saves and registers.

Guided alignment (``train.guided_alignment_weight`` > 0; Garg et al. 2019) adds a loss pulling one
cross-attention head (``train.guided_alignment_layer``/``guided_alignment_head``) towards eflomal's
word alignments of the training corpus (:mod:`stepwise.train.alignments`, aligned once per corpus
version). When the validation split is the hand-aligned gold set (:mod:`stepwise.train.gold`, the
bundled de→en corpus), every evaluation also scores the model's word alignments against it
(teacher-forced, the predicting step's cross-attention: the service's reading): the AER of the
average of all layers and heads and, with guided alignment, of the guided head, reported as
ClearML scalars; the better of the two, with its layer and head, goes into each registered
version's metadata (``aer``, ``alignment_reading``, ``alignment_layer``, ``alignment_head``), and
the service aligns with that reading by default.

The tracking server may go away mid-run (a restart): the SDK keeps the scalars and console
lines it could not send and delivers them when the server is back, and a checkpoint saved
meanwhile stays on disk (with its export) in a pending-registration queue, retried at each later save and at
the end (where training waits up to ``REGISTRATION_WAIT_S`` for the server), so every save is
registered. Checkpoints are written atomically to ``OUTPUT_DIR/checkpoints/step-NNNNNNN.pt``; ``--resume``
continues from the newest one that loads, restoring weights, optimizer, schedule, data position
and RNG state, and continuing the same ClearML task.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from stepwise.config import Config, TrainConfig, load_config, preset_path
from stepwise.errors import StepwiseError
from stepwise.model import Transformer
from stepwise.registry import client as registry
from stepwise.registry import tracking
from stepwise.serve import alignment as word_alignments
from stepwise.tokenizer import Tokenizer
from stepwise.train.checkpoint import Checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from stepwise.train.data import Batch, dataset_copy, encode_pairs, load_split, pad_sequences, token_batches
from stepwise.train.evaluate import encode_sources, evaluate_bleu
from stepwise.train.gold import gold_for, scores
from stepwise.train.schedule import TrainingClock, build_optimizer

log = logging.getLogger(__name__)
REGISTRATION_WAIT_S = 600.0  # at the end of a run, how long to wait for the server to register pending saves
ALIGNMENT_READING = "predicting step"  # the cross-attention row that aligns a target piece: the service's rule


def guided_alignment_loss(attention: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Garg et al. (2019)'s alignment loss: the cross-entropy of one head's attention against the gold rows.

    ``-sum_s p(s | t) log a(t, s)`` for each target position ``t`` that has a link, averaged over
    those positions; positions without a link (padding, EOS, unaligned words) add nothing.

    Args:
        attention: ``[B, T, S]`` one head's cross-attention weights, rows summing to 1.
        gold: ``[B, T, S]`` the normalised gold alignment rows (:meth:`Batch.alignment_rows`), rows
            summing to 1 where the position has a link, all zeros elsewhere.

    Returns:
        A scalar (0, still attached to the graph, when no position has a link).
    """
    linked = gold.sum(dim=-1) > 0
    if not bool(linked.any()):
        return attention.sum() * 0.0
    log_attention = torch.log(attention.float().clamp_min(1e-9))
    cross_entropy = -(gold * log_attention).sum(dim=-1)
    return cross_entropy[linked].mean()


@dataclass
class PendingRegistration:
    """A saved checkpoint not registered yet (the tracking server was unreachable)."""

    path: Path
    step: int
    metadata: dict[str, Any]
    model: Any = None  # the version an interrupted attempt created, finished by the next one
    tags: list[str] | None = None  # default: candidate
    comment: str = ""
    export_dir: Path | None = None  # its ONNX export, registered beside it (None: train.export_onnx off)
    model_id: str | None = None  # the checkpoint's version, once registered
    export_model: Any = None  # the export's version an interrupted attempt created


@dataclass
class Distributed:
    """Where this process sits in a (possibly single-process) data-parallel job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    info = Distributed(rank=dist.get_rank(), world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return info


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``stepwise train`` / ``python -m stepwise.train``."""
    parser = argparse.ArgumentParser(prog="stepwise train", description="Train a translation transformer, "
                                     "tracked in ClearML, registering each checkpoint as a model version.")
    parser.add_argument("--config", default="config/default.json", help="JSON config (default config/default.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. train.max_steps=2000 (repeatable)")
    parser.add_argument("--project-name", default="stepwise", help="ClearML project (default stepwise)")
    parser.add_argument("--task-name", default=None, help="ClearML task name (default: the config's name)")
    parser.add_argument("--output-dir", default=None, help="checkpoint folder (default runs/TASK_NAME)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT_DIR")
    parser.add_argument("--queue", default=None, help="enqueue the run for a ClearML agent instead of running here")
    parser.add_argument("--offline", action="store_true",
                        help="record a ClearML offline session (tracking only: nothing is registered)")
    parser.add_argument("--no-register", action="store_true", help="do not register checkpoints in the registry")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


class Trainer:
    """One training run; see the module docstring."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        agent_task = _agent_task_id()
        if agent_task and not preset_path(args.config).is_file():
            # under a ClearML agent without the checkout's files: the config arrives with the
            # task's "config" parameters (connected in start_tracking), so start from the defaults
            log.info("config %s not on this machine: taking the config from ClearML task %s", args.config, agent_task)
            self.config = load_config(None, args.set)
        else:
            self.config = load_config(args.config, args.set)
        self.task_name = args.task_name or self.config.name
        self.output_dir = Path(args.output_dir or Path("runs") / self.task_name)
        if agent_task:  # every run an agent executes (a clone too) gets a folder of its own
            self.output_dir = self.output_dir / agent_task
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.task: Any = None
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.last_metrics: dict[str, float] = {}
        self.registered: list[str] = []  # the checkpoints' versions
        self.exports: dict[str, str] = {}  # checkpoint version -> its ONNX export's version
        self.pending: list[PendingRegistration] = []
        self.clock = TrainingClock()  # training seconds over every invocation (train/schedule.py)
        self.lr = 0.0  # the learning rate the last optimizer step used
        self.alignment_loss: float | None = None  # the guided-alignment loss of the last step
        self.gold: list[Any] | None = None  # the gold verses, when the validation split is them

    # -- set-up ---------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint in the output folder that loads (a torn file is skipped)."""
        for path in sorted(self.checkpoint_dir.glob("step-*.pt"), reverse=True):
            try:
                return load_checkpoint(path)
            except StepwiseError as exc:
                log.warning("skipping unreadable checkpoint: %s", exc)
        return None

    def start_tracking(self, resumed: Checkpoint | None) -> None:
        """Task.init on rank 0, connect the config (remote edits come back), maybe enqueue."""
        if not self.dist.is_main:
            return
        from clearml import Task

        if self.args.offline:
            Task.set_offline(offline_mode=True)
        else:
            tracking.check_server()
        previous = (resumed.data_state or {}).get("clearml_task_id") if resumed else None
        self.task = Task.init(project_name=self.args.project_name, task_name=self.task_name,
                              output_uri=not self.args.offline, auto_connect_frameworks=False,
                              auto_resource_monitoring=True, reuse_last_task_id=False,
                              continue_last_task=previous or False)
        connected = self.task.connect(self.config.to_dict(), name="config")
        self.config = Config.from_dict(_restore_types(connected, self.config.to_dict()))
        if self.args.queue and self.task.running_locally():
            _ensure_queue(self.args.queue)
            self._make_runnable_by_agent()
            log.info("enqueueing task %s on queue %r for a ClearML agent", self.task.id, self.args.queue)
            self.task.execute_remotely(queue_name=self.args.queue, exit_process=True)

    def _make_runnable_by_agent(self) -> None:
        """An agent runs ``python <script.entry_point>``: launched as ``stepwise train`` the SDK
        records the console script, which an agent cannot run; record ``-m stepwise.train ARGS`` instead."""
        self.task._wait_for_repo_detection(timeout=300.0)  # the SDK detects the script in a thread
        entry_point = (self.task.data.script.entry_point if self.task.data.script else "") or ""
        if not entry_point.strip().startswith("-m "):
            args = [a for a in (self.args.argv or []) if a]
            self.task.set_script(entry_point=shlex.join(["-m", "stepwise.train", *args]), working_dir=".")

    def prepare_data(self, resumed: Checkpoint | None) -> None:
        data = self.config.data
        train_pairs = load_split(data, "train")
        if data.max_train_pairs:
            train_pairs = train_pairs[: data.max_train_pairs]
        self.valid_pairs = load_split(data, "valid")
        if resumed is not None:
            self.tokenizer = resumed.tokenizer()
        else:
            tokenizer_path = self.output_dir / "tokenizer.model"
            if self.dist.is_main:
                started = time.monotonic()
                sentences = [s for pair in train_pairs for s in pair]
                tokenizer = Tokenizer.train(sentences, vocab_size=self.config.model.vocab_size,
                                            model_type=data.tokenizer_model_type,
                                            character_coverage=data.character_coverage)
                self.output_dir.mkdir(parents=True, exist_ok=True)
                tokenizer.save(tokenizer_path)
                log.info("tokenizer: %d pieces trained in %.1fs", tokenizer.vocab_size, time.monotonic() - started)
            self.dist.barrier()
            self.tokenizer = Tokenizer.load(tokenizer_path)
        # the vocabulary actually learned can be smaller than asked on a small corpus
        self.config.model.vocab_size = self.tokenizer.vocab_size
        max_positions = self.config.model.max_positions
        alignments = None
        if self.config.train.guided_alignment_weight > 0:
            alignments = self.training_alignments()[: len(train_pairs)]
        self.train_examples = encode_pairs(train_pairs, self.tokenizer, data.max_length, max_positions=max_positions,
                                           alignments=alignments)
        self.gold = gold_for(self.valid_pairs)
        if self.gold is None:
            log.info("the validation split is not the gold set (bundled de-en corpus only): no alignment error rate")
        self.valid_examples = encode_pairs(self.valid_pairs, self.tokenizer, data.max_length,
                                           max_positions=max_positions)
        if not self.train_examples:
            raise StepwiseError("no training pairs left after filtering by data.max_length")
        log.info("data: %d training pairs, %d validation pairs", len(self.train_examples), len(self.valid_examples))

    def training_alignments(self) -> list[set[tuple[int, int]]]:
        """eflomal's word links of the training pairs (:func:`stepwise.train.alignments.training_alignments`):
        the whole split, or only the first ``data.max_train_pairs`` when a run is capped (aligning
        costs time in proportion to the pairs; a dataset version's stored links cover the split).

        Rank 0 aligns (or reads them) first; the other ranks then read what it stored.
        """
        from stepwise.train.alignments import training_alignments

        data = self.config.data
        folder = dataset_copy(data.dataset)[1] if data.dataset else None
        pairs = load_split(data, "train")
        if data.max_train_pairs and folder is None:
            pairs = pairs[: data.max_train_pairs]
        links = training_alignments(pairs, dataset_folder=folder) if self.dist.is_main else []
        self.dist.barrier()
        return links if self.dist.is_main else training_alignments(pairs, dataset_folder=folder)

    def build(self, resumed: Checkpoint | None) -> None:
        torch.manual_seed(self.config.train.seed)
        self.model = Transformer(self.config.model).to(self.device)
        if resumed is not None:
            self.clock = TrainingClock(spent=float(resumed.data_state.get("train_seconds", 0.0)))
        self.optimizer, self.scheduler = build_optimizer(self.model, self.config, self.clock)
        if resumed is not None:
            self.model.load_state_dict(resumed.model_state)
            self.optimizer.load_state_dict(resumed.optimizer_state)
            self.scheduler.load_state_dict(resumed.scheduler_state)
            self.step = resumed.step
            self.epoch = resumed.data_state["epoch"]
            self.batch_in_epoch = resumed.data_state["batch_in_epoch"]
            self.last_metrics = dict(resumed.metrics)
            if resumed.rng_state and self.dist.is_main:
                set_rng_state(resumed.rng_state)
            log.info("resumed from step %d (epoch %d, batch %d)", self.step, self.epoch, self.batch_in_epoch)
        self.ddp_model: torch.nn.Module = self.model
        if self.dist.world_size > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("model: %.2fM parameters on %s, world size %d", n_params / 1e6, self.device, self.dist.world_size)

    # -- the loop -------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[Batch]:
        """This rank's share of one epoch's batches (same count on every rank)."""
        batches = list(token_batches(self.train_examples, self.config.train.batch_tokens, shuffle=True,
                                     seed=self.config.train.seed + epoch))
        per_rank = len(batches) // self.dist.world_size
        return batches[self.dist.rank :: self.dist.world_size][:per_rank]

    def train_step(self, batch: Batch, accuracy: bool = True) -> tuple[float, float, int, float]:
        """Forward, backward, clip, step; returns (loss/token, accuracy, tokens, grad norm).

        ``accuracy=False`` skips the token accuracy (an argmax over every logit, ~7% of a quick-preset
        step on CPU) for steps that report nothing, and returns NaN in its place.
        """
        cfg = self.config.train
        batch = batch.to(self.device)
        self.ddp_model.train()
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                    else nullcontext())
        guided = cfg.guided_alignment_weight > 0 and batch.alignment is not None
        with autocast:
            if guided:
                logits, cross = self.ddp_model(batch.src, batch.tgt_in, batch.src_pad_mask, batch.tgt_pad_mask,
                                               cross_attention_layer=cfg.guided_alignment_layer)
            else:
                logits = self.ddp_model(batch.src, batch.tgt_in, batch.src_pad_mask, batch.tgt_pad_mask)
        tokens = batch.target_tokens
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), batch.tgt_out.flatten(),
                                   ignore_index=self.tokenizer.pad_id, label_smoothing=cfg.label_smoothing,
                                   reduction="sum")
        loss = loss_sum / max(tokens, 1)
        total = loss
        if guided:
            alignment_loss = guided_alignment_loss(cross[:, cfg.guided_alignment_head], batch.alignment_rows())
            total = loss + cfg.guided_alignment_weight * alignment_loss
            self.alignment_loss = alignment_loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.clock.tick(self.rank_zero_value)  # what the schedule and the deadline read
        self.scheduler.step()
        token_accuracy = math.nan
        if accuracy:
            with torch.no_grad():
                keep = ~batch.tgt_pad_mask
                token_accuracy = float((logits.argmax(-1) == batch.tgt_out)[keep].float().mean())
        return loss.item(), token_accuracy, tokens, float(grad_norm)

    def rank_zero_value(self, value: float) -> float:
        """``value`` as rank 0 has it (a broadcast; the value itself in a single process)."""
        if self.dist.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return float(tensor.item())

    def run(self) -> int:
        resumed = None
        if self.args.resume:
            resumed = self.latest_checkpoint()
            if resumed is None:
                raise StepwiseError(f"--resume: no checkpoint in {self.checkpoint_dir}")
            self.config = resumed.config.override(self.args.set) if self.args.set else resumed.config
        elif any(self.checkpoint_dir.glob("step-*.pt")) and self.dist.is_main:
            raise StepwiseError(f"{self.output_dir} holds checkpoints of an earlier run: pass --resume to continue "
                                "it, or --output-dir/--task-name for a new run")
        self.start_tracking(resumed)
        self.prepare_data(resumed)
        self.build(resumed)
        cfg = self.config.train
        budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf  # seconds of the run's training clock
        progress = ProgressBar(cfg, self.step, spent=self.clock.spent, disable=not self.dist.is_main)
        self.clock.start()
        tokens_since, time_since = 0, time.monotonic()
        stop_reason = "max_steps"
        try:
            while self.step < cfg.max_steps:
                batches = self.epoch_batches(self.epoch)
                for batch in batches[self.batch_in_epoch :]:
                    reporting = (self.step + 1) % cfg.log_every == 0 or self.step == 0  # the step about to run
                    loss, accuracy, tokens, grad_norm = self.train_step(batch, accuracy=reporting)
                    self.step += 1
                    self.batch_in_epoch += 1
                    tokens_since += tokens * self.dist.world_size
                    if reporting:
                        elapsed = time.monotonic() - time_since
                        rate = tokens_since / max(elapsed, 1e-9)
                        tokens_since, time_since = 0, time.monotonic()
                        self.report_training(loss, accuracy, grad_norm, rate)
                        postfix = {"loss": f"{loss:.3f}", "tok/s": f"{rate:,.0f}",
                                   "lr": f"{self.lr:.2e}"}
                        progress.set_postfix(postfix, refresh=False)
                    progress.advance(self.step, elapsed=self.clock.seconds() - self.clock.spent)
                    at_save = self.step % cfg.save_every == 0
                    if self.step % cfg.eval_every == 0 or at_save:
                        self.evaluate()
                    if at_save:
                        self.save_and_register()
                    if self.step >= cfg.max_steps:
                        break
                    if self.clock.seconds() >= budget:
                        stop_reason = "max_minutes"
                        break
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    continue
                break
        except KeyboardInterrupt:
            progress.close()
            log.warning("interrupted at step %d: saving a checkpoint before exiting", self.step)
            if self.dist.is_main:
                save_checkpoint(self.checkpoint_path(), self.checkpoint())
            self.finish(status="interrupted")
            return 130
        progress.finish()
        log.info("stopped at step %d (%s)", self.step, stop_reason)
        if self.step % cfg.save_every != 0:
            self.evaluate()
            self.save_and_register()
        if cfg.average_last:
            self.average_and_register()
        self.finish(status="completed")
        return 0

    # -- evaluation, reporting, saving ------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> None:
        """Validation loss, token accuracy and BLEU; attention heatmaps. Rank 0 only."""
        if not self.dist.is_main:
            self.dist.barrier()
            return
        cfg = self.config.train
        started = time.monotonic()
        self.last_metrics, hypotheses = self.validation_metrics(self.model)
        bleu = self.last_metrics["bleu"]
        if self.task is not None:
            logger = self.task.get_logger()
            logger.report_scalar("loss", "validation", self.last_metrics["val_loss"], iteration=self.step)
            logger.report_scalar("token accuracy", "validation", self.last_metrics["val_accuracy"],
                                 iteration=self.step)
            logger.report_scalar("BLEU", f"validation (beam {cfg.eval_beam_size})", bleu, iteration=self.step)
            if "aer" in self.last_metrics:
                logger.report_scalar("alignment error rate (gold)", "average of all layers and heads",
                                     self.last_metrics["aer_average"], iteration=self.step)
                if "aer_guided" in self.last_metrics:
                    layer = range(self.config.model.n_decoder_layers)[cfg.guided_alignment_layer]
                    logger.report_scalar("alignment error rate (gold)", f"guided: layer {layer} head "
                                         f"{cfg.guided_alignment_head}", self.last_metrics["aer_guided"],
                                         iteration=self.step)
            for i, (src, _) in enumerate(self.valid_pairs[: cfg.heatmap_sentences]):
                self.report_heatmaps(logger, i, src)
        log.info("step %d: val loss %.3f, accuracy %.3f, BLEU %.2f%s (evaluated in %.1fs) | %s -> %s",
                 self.step, self.last_metrics["val_loss"], self.last_metrics["val_accuracy"], bleu,
                 f", gold AER {self.last_metrics['aer']:.3f}" if "aer" in self.last_metrics else "",
                 time.monotonic() - started, self.valid_pairs[0][0][:60], hypotheses[0][:60])
        self.dist.barrier()

    @torch.no_grad()
    def validation_metrics(self, model: Transformer) -> tuple[dict[str, float], list[str]]:
        """``model``'s validation loss, token accuracy and BLEU (and its gold-set AER); and its translations."""
        cfg = self.config.train
        model.eval()
        loss_sum, correct, total = 0.0, 0, 0
        for batch in token_batches(self.valid_examples, cfg.batch_tokens, shuffle=False):
            batch = batch.to(self.device)
            logits = model(batch.src, batch.tgt_in, batch.src_pad_mask, batch.tgt_pad_mask)
            loss_sum += float(F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(),
                                              ignore_index=self.tokenizer.pad_id, reduction="sum"))
            keep = ~batch.tgt_pad_mask
            correct += int((logits.argmax(-1) == batch.tgt_out)[keep].sum())
            total += int(keep.sum())
        bleu, hypotheses = evaluate_bleu(model, self.tokenizer, self.valid_pairs, beam_size=cfg.eval_beam_size,
                                         limit=cfg.eval_sentences)
        metrics = {"val_loss": loss_sum / max(total, 1), "val_accuracy": correct / max(total, 1), "bleu": bleu}
        if self.gold is not None:
            metrics.update(self.gold_alignment_error_rates(model))
        return metrics, hypotheses

    @torch.no_grad()
    def gold_alignment_error_rates(self, model: Transformer) -> dict[str, float]:
        """AER of ``model``'s word alignments on the gold verses, teacher-forced on their references.

        Returns:
            ``aer_average`` (all layers and heads averaged) and, with guided alignment on,
            ``aer_guided`` (the guided head); ``aer`` is the better of them.
        """
        assert self.gold is not None
        cfg = self.config.train
        model.eval()
        layers = model.config.n_decoder_layers
        readings: dict[str, tuple[Any, Any]] = {"aer_average": (word_alignments.AVERAGE, word_alignments.AVERAGE)}
        if cfg.guided_alignment_weight > 0:
            readings["aer_guided"] = (range(layers)[cfg.guided_alignment_layer], cfg.guided_alignment_head)
        sources = encode_sources(self.tokenizer, [verse.source for verse in self.gold], model.config.max_positions)
        targets = [ids[: model.config.max_positions] for ids in
                   self.tokenizer.encode_batch([verse.reference for verse in self.gold])]  # pieces + EOS
        eos = self.tokenizer.pieces([self.tokenizer.eos_id])[0]
        links: dict[str, list[set[tuple[int, int]]]] = {name: [] for name in readings}
        for start in range(0, len(self.gold), 16):
            chunk = range(start, min(start + 16, len(self.gold)))
            src, src_mask = pad_sequences([sources[n] for n in chunk], pad_id=model.config.pad_id)
            tgt_in, tgt_mask = pad_sequences([[self.tokenizer.bos_id, *targets[n][:-1]] for n in chunk],
                                             pad_id=model.config.pad_id)
            _, attention = model(src.to(self.device), tgt_in.to(self.device), src_mask.to(self.device),
                                 tgt_mask.to(self.device), return_attention=True)
            cross = torch.stack(attention["cross"], dim=1).float().cpu().numpy()  # [B, L, H, T, S]
            for row, n in enumerate(chunk):
                weights = cross[row, :, :, : len(targets[n]), : len(sources[n])]
                source_pieces, target_pieces = self.tokenizer.pieces(sources[n]), self.tokenizer.pieces(targets[n])
                for name, (layer, head) in readings.items():
                    aligned = word_alignments.word_alignment(word_alignments.attention_source(weights, layer, head),
                                                             source_pieces, target_pieces, eos=eos)
                    links[name].append(set(aligned.hard()) if len(aligned.target_words) ==
                                       len(self.gold[n].target_words) else set())
        rates = {name: scores(found, self.gold)[0] for name, found in links.items()}
        rates["aer"] = min(rates.values())
        return rates

    def alignment_metadata(self, metrics: dict[str, float]) -> dict[str, Any]:
        """The gold-set AER of ``metrics`` with the reading, layer and head it was measured with (registry
        metadata; empty without a gold set): the guided head when it aligns better than the average."""
        if "aer" not in metrics:
            return {}
        cfg = self.config.train
        layer: Any = word_alignments.AVERAGE
        head: Any = word_alignments.AVERAGE
        if "aer_guided" in metrics and metrics["aer_guided"] < metrics["aer_average"]:
            layer = range(self.config.model.n_decoder_layers)[cfg.guided_alignment_layer]
            head = cfg.guided_alignment_head
        return {"aer": round(metrics["aer"], 4), "alignment_reading": ALIGNMENT_READING,
                "alignment_layer": layer, "alignment_head": head}

    def registration_metadata(self, metrics: dict[str, float]) -> dict[str, Any]:
        """What a registered version's metadata records of a checkpoint with these validation metrics."""
        return {"bleu": round(metrics.get("bleu", 0.0), 2), "loss": round(metrics.get("val_loss", float("nan")), 4),
                "step": self.step, "config_hash": self.config.hash(),
                "language_pair": self.config.data.language_pair, **self.alignment_metadata(metrics)}

    def report_heatmaps(self, logger: Any, index: int, sentence: str) -> None:
        """Cross-attention of a fixed sentence: head-averaged and per head, for every layer."""
        from stepwise.train.evaluate import encode_sources, translate_ids

        (source,) = encode_sources(self.tokenizer, [sentence], self.config.model.max_positions)
        hyp = translate_ids(self.model, [source], return_attention=True)[0]
        src_labels = _unique_labels(self.tokenizer.pieces(source))
        out_ids = hyp.tokens + ([self.tokenizer.eos_id] if hyp.finished else [])
        tgt_labels = _unique_labels(self.tokenizer.pieces(out_ids))
        for layer, weights in enumerate(hyp.attention["cross"]):
            title = f"cross-attention sentence {index} layer {layer}"
            views = [("head average", weights.mean(0))] + [(f"head {h}", weights[h]) for h in range(weights.shape[0])]
            for series, matrix in views:
                # stored as Plotly's z[row][column]: a row per target token (y), a column per source token (x)
                logger.report_confusion_matrix(title=title, series=series, matrix=matrix,
                                               iteration=self.step, xaxis="source", yaxis="target",
                                               xlabels=src_labels, ylabels=tgt_labels, yaxis_reversed=True)

    def report_training(self, loss: float, accuracy: float, grad_norm: float, tokens_per_s: float) -> None:
        if self.task is None:
            return
        logger = self.task.get_logger()
        logger.report_scalar("loss", "train", loss, iteration=self.step)
        logger.report_scalar("token accuracy", "train", accuracy, iteration=self.step)
        logger.report_scalar("learning rate", "lr", self.lr, iteration=self.step)
        logger.report_scalar("gradient norm", "global", grad_norm, iteration=self.step)
        for name, norm in _layer_grad_norms(self.model).items():
            logger.report_scalar("gradient norm per layer", name, norm, iteration=self.step)
        logger.report_scalar("throughput", "target tokens/s", tokens_per_s, iteration=self.step)
        if self.alignment_loss is not None:
            logger.report_scalar("loss", "guided alignment (train)", self.alignment_loss, iteration=self.step)

    def checkpoint_path(self) -> Path:
        return self.checkpoint_dir / f"step-{self.step:07d}.pt"

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            config=self.config, model_state=self.model.state_dict(), tokenizer_model=self.tokenizer.model_proto,
            step=self.step, metrics=dict(self.last_metrics), optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(), rng_state=rng_state(),
            data_state={"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                        "clearml_task_id": self.task.id if self.task is not None else None,
                        "train_seconds": self.clock.seconds()})

    def save_and_register(self) -> None:
        """Save a checkpoint, queue it for registration, register what the server takes now."""
        if not self.dist.is_main:
            return
        path = save_checkpoint(self.checkpoint_path(), self.checkpoint())
        log.info("saved %s", path)
        if self.registering:
            self.queue_registration(PendingRegistration(path, self.step, self.registration_metadata(self.last_metrics)))
        waiting = {item.path.name for item in self.pending}  # never delete a save before it is registered
        for old in sorted(self.checkpoint_dir.glob("step-*.pt"))[: -self.config.train.keep_checkpoints]:
            if old.name not in waiting:
                old.unlink()
                shutil.rmtree(self.export_dir(old), ignore_errors=True)

    @property
    def registering(self) -> bool:
        """Whether saves are registered: a task, online, and not ``--no-register``."""
        return self.task is not None and not self.args.offline and not self.args.no_register

    def export_dir(self, checkpoint: Path) -> Path:
        """Where a checkpoint's ONNX export is written: ``OUTPUT_DIR/exports/<checkpoint name>``."""
        return self.output_dir / "exports" / checkpoint.stem

    def queue_registration(self, item: PendingRegistration) -> None:
        """Export the saved checkpoint (``train.export_onnx``), queue both, register what the server takes now.

        A checkpoint whose export fails is not queued: every registered version has its export.
        """
        if self.config.train.export_onnx:
            item.export_dir = self.export_onnx(item.path)
            if item.export_dir is None:
                return
        self.pending.append(item)
        self.register_pending()

    def export_onnx(self, path: Path) -> Path | None:
        """Export a saved checkpoint to ONNX (parity-checked), off the training clock; None when it failed.

        The failure is logged, never raised: training goes on. The export uses the CPU and leaves
        the random number generators as they were (a resumed run continues the same streams).
        """
        from stepwise.export import export_checkpoint

        out = self.export_dir(path)
        sentences = [source for source, _ in self.valid_pairs[: self.config.train.export_parity_sentences]] or None
        with self.clock.paused(), torch.random.fork_rng(devices=[]):
            try:
                manifest = export_checkpoint(load_checkpoint(path), out, sentences=sentences,
                                             source={"name": self.config.name, "checkpoint": path.name})
            except Exception as exc:  # noqa: BLE001 - a failed export costs its save's registration, not the run
                log.error("ONNX export of %s failed, so this save is not registered (the checkpoint stays in %s "
                          "like any save): %s", path.name, path.parent, exc)
                return None
        log.info("exported %s to ONNX in %.1fs (off the training clock)", path.name, manifest["export_seconds"])
        return out

    def register_pending(self) -> bool:
        """Register the queued checkpoints, oldest first; stop at the first failure. True when none is left."""
        while self.pending:
            item = self.pending[0]
            try:
                if item.model_id is None:
                    item.model_id = registry.register_checkpoint(
                        self.task, item.path, name=self.config.name, step=item.step, metadata=item.metadata,
                        model=item.model, tags=item.tags, comment=item.comment)
                if item.export_dir is not None:
                    self.exports[item.model_id] = self.register_export(item)
            except Exception as exc:  # noqa: BLE001 - the checkpoint is safe on disk; training goes on
                if isinstance(exc, registry.RegistrationInterrupted):
                    if item.model_id is None:
                        item.model = exc.model
                    else:
                        item.export_model = exc.model
                log.warning("could not register %s%s in ClearML (%s); it stays in %s and is retried at the next "
                            "save and at the end (%d pending)", item.path.name,
                            "'s ONNX export" if item.model_id else "", exc, item.path.parent, len(self.pending))
                return False
            self.pending.pop(0)
            self.registered.append(item.model_id)
        return True

    def register_export(self, item: PendingRegistration) -> str:
        """Register a queued checkpoint's export beside its version (registered already), on this run's task."""
        from stepwise.decode.onnx_runtime import MANIFEST_FILE

        assert item.export_dir is not None and item.model_id is not None
        manifest_path = item.export_dir / MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text())
        manifest["source_model"] = {"id": item.model_id, "name": self.config.name,
                                    "tags": item.tags or [registry.CANDIDATE], "project": self.task.project,
                                    "checkpoint": item.path.name,
                                    "metadata": {key: str(value) for key, value in item.metadata.items()}}
        manifest_path.write_text(json.dumps(manifest, indent=2))  # the export names its version
        return registry.register_export(item.export_dir, manifest, task=self.task, model=item.export_model)

    def register_pending_at_end(self, wait_s: float) -> None:
        """Before closing the task: wait (up to ``wait_s``) for the server to take the pending saves."""
        deadline = time.monotonic() + wait_s
        if self.pending and not self.register_pending() and wait_s > 0:
            log.info("waiting up to %.0fs for the ClearML server to register %d pending checkpoint(s)", wait_s,
                     len(self.pending))
        while self.pending and time.monotonic() < deadline:
            time.sleep(5.0)
            self.register_pending()
        if self.pending:
            log.error("ClearML server unreachable: %d checkpoint(s) stay unregistered on disk: %s", len(self.pending),
                      ", ".join(str(p.path) for p in self.pending))

    def average_and_register(self) -> None:
        """``train.average_last``: average the last saves (stepwise/train/averaging.py), score the average on
        the validation set, save it beside the saves (``average-step-N.pt``, which ``--resume`` and
        the rotation of old saves leave alone) and register it as its own version (through the
        pending queue, like every save)."""
        if not self.dist.is_main:
            return
        from stepwise.train.averaging import average_checkpoints

        cfg = self.config.train
        saves = sorted(self.checkpoint_dir.glob("step-*.pt"))[-cfg.average_last :]
        if len(saves) < 2:
            log.info("train.average_last: %d save(s), nothing to average", len(saves))
            return
        averaged = average_checkpoints([load_checkpoint(path) for path in saves])
        steps = averaged.data_state["averaged_steps"]
        averaged.metrics, _ = self.validation_metrics(averaged.build_model().to(self.device))
        path = save_checkpoint(self.checkpoint_dir / f"average-step-{self.step:07d}.pt", averaged)
        bleu = averaged.metrics["bleu"]
        log.info("averaged steps %s into %s: validation BLEU %.2f (last save %.2f)", ", ".join(map(str, steps)),
                 path, bleu, self.last_metrics.get("bleu", float("nan")))
        if self.task is None:
            return
        self.task.get_logger().report_scalar("BLEU", f"validation (beam {cfg.eval_beam_size}), average of last "
                                             f"{len(steps)}", bleu, iteration=self.step)
        if self.args.offline or self.args.no_register:
            return
        metadata = {**self.registration_metadata(averaged.metrics), "averaged_steps": ",".join(map(str, steps))}
        self.queue_registration(PendingRegistration(path, self.step, metadata, tags=[registry.CANDIDATE, "averaged"],
                                                    comment=f"average of steps {metadata['averaged_steps']}"))

    def finish(self, status: str) -> None:
        if self.task is not None:
            if self.args.offline:
                self.task.close()
                log.info("offline session recorded in %s; import it with "
                         "Task.import_offline_session(<that folder>.zip)", self.task.get_offline_mode_folder())
            else:
                self.register_pending_at_end(REGISTRATION_WAIT_S if status == "completed" else 0.0)
                self.task.get_logger().flush(wait=True)
                if status == "completed":
                    self.task.mark_completed()
                self.task.close()
        if self.dist.world_size > 1:
            dist.destroy_process_group()


@dataclass(frozen=True)
class ProgressPlan:
    """What the training progress bar counts: ``total`` of ``unit`` (``"step"`` or ``"s"``)."""

    total: int
    unit: str


def progress_plan(train: TrainConfig, *, step: int, elapsed: float = 0.0, steps_run: int = 0,
                  spent: float = 0.0) -> ProgressPlan:
    """The progress bar's total: what ends the run, whichever comes first.

    Without a time budget (``train.max_minutes`` 0) the run ends at ``train.max_steps``, and the
    bar counts steps. With one, the bar counts seconds: up to the budget, or, when the remaining
    steps would run out first at the pace measured so far, up to that moment. So a ten-minute
    run shows ten minutes, not the hours that ``max_steps`` would take.

    Args:
        train: the run's settings.
        step: the optimizer step reached (a resumed run starts past 0).
        elapsed: seconds since this invocation started training.
        steps_run: steps taken in those seconds (0: pace unknown yet).
        spent: training seconds of earlier invocations (the budget is the run's, resumes included).
    """
    if not train.max_minutes:
        return ProgressPlan(total=train.max_steps, unit="step")
    seconds = train.max_minutes * 60
    if steps_run:
        seconds = min(seconds, spent + elapsed + (train.max_steps - step) * elapsed / steps_run)
    return ProgressPlan(total=max(1, math.ceil(seconds)), unit="s")


class ProgressBar:
    """The tqdm bar of a training run, counting what :func:`progress_plan` says ends it."""

    FORMATS = {"step": "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
               "s": "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}s [{elapsed}<{remaining}{postfix}]"}

    def __init__(self, train: TrainConfig, step: int, *, spent: float = 0.0, disable: bool = False) -> None:
        self.train = train
        self.first_step = self.step = step
        self.spent = spent  # training seconds of earlier invocations of this run
        self.postfix: dict[str, str] = {}
        self.started = time.monotonic()
        self.plan = progress_plan(train, step=step, spent=spent)
        initial = step if self.plan.unit == "step" else min(int(spent), self.plan.total)
        self.bar = tqdm(total=self.plan.total, initial=initial, unit=self.plan.unit,
                        desc="time budget" if self.plan.unit == "s" else None, disable=disable, dynamic_ncols=True,
                        mininterval=1.0, bar_format=self.FORMATS[self.plan.unit])

    def advance(self, step: int, elapsed: float | None = None) -> None:
        """One more optimizer step was taken (``step`` is the new step number).

        Args:
            step: the new step number.
            elapsed: this invocation's training seconds (the training clock's, which skips the
                exports); default: wall-clock seconds since the bar was made.
        """
        self.step = step
        if self.plan.unit == "step":
            self.bar.update(1)
            return
        if elapsed is None:
            elapsed = time.monotonic() - self.started
        self.plan = progress_plan(self.train, step=step, elapsed=elapsed, steps_run=step - self.first_step,
                                  spent=self.spent)
        self.bar.total = self.plan.total
        self.set_postfix(self.postfix)
        self.bar.update(min(int(self.spent + elapsed), self.plan.total) - self.bar.n)

    def set_postfix(self, postfix: dict[str, str], refresh: bool = False) -> None:
        """Figures shown after the bar; a bar counting seconds also shows the step."""
        self.postfix = postfix
        if self.plan.unit == "s":
            postfix = {"step": f"{self.step:,}", **postfix}
        self.bar.set_postfix(postfix, refresh=refresh)

    def finish(self) -> None:
        """The run ended (its budget spent or its steps done): the bar shows it full."""
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()

    def close(self) -> None:
        """Stop drawing the bar where it is (an interrupted run)."""
        self.bar.close()


def _agent_task_id() -> str | None:
    """The id of the ClearML task an agent is executing in this process, else None."""
    from clearml import Task

    return None if Task.running_locally() else os.environ.get("CLEARML_TASK_ID")


def _ensure_queue(name: str) -> None:
    """Create the execution queue if the server has none of that name (agents watch queues by name)."""
    from clearml.backend_api.session.client import APIClient

    client = APIClient()
    if not client.queues.get_all(name=f"^{name}$"):
        log.info("creating ClearML queue %r", name)
        client.queues.create(name=name)


def _restore_types(connected: Any, original: dict[str, Any]) -> dict[str, Any]:
    """ClearML hands edited values back as they were typed in the UI: cast to the original types."""
    if not isinstance(connected, dict):
        return original
    result = {}
    for key, value in original.items():
        new = connected.get(key, value)
        if isinstance(value, dict):
            result[key] = _restore_types(new, value)
        elif isinstance(new, str) and not isinstance(value, str):
            import json

            try:
                result[key] = json.loads(new)
            except json.JSONDecodeError:
                result[key] = new
        else:
            result[key] = new
    return result


def _unique_labels(pieces: list[str]) -> list[str]:
    """Plot axes need distinct labels: suffix repeated pieces with their position."""
    seen: dict[str, int] = {}
    labels = []
    for i, piece in enumerate(pieces):
        labels.append(piece if piece not in seen else f"{piece} ({i})")
        seen[piece] = i
    return labels


def _layer_grad_norms(model: Transformer) -> dict[str, float]:
    """L2 norm of the gradients of each layer (and of the embeddings)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0].endswith("_layers") else parts[0]
        groups.setdefault(key, []).append(param.grad.detach().norm())
    return {key: float(torch.stack(norms).norm()) for key, norms in groups.items()}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m stepwise.train`` and ``stepwise train``."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    try:
        return Trainer(args).run()
    except StepwiseError as exc:
        print(f"stepwise train: error: {exc}", file=sys.stderr)
        return 2
