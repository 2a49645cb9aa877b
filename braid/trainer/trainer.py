"""The training loop: config → data → model → parallelism → steps, evaluation, checkpoints, logs."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Optional

import torch

from braid.config import Config, to_yaml, virtual_stages
from braid.data.loader import SampleOrder, micro_batches
from braid.data.packing import build_datasets
from braid.data.tokenizer import load_tokenizer
from braid.errors import NonFiniteLossError  # noqa: F401  re-exported: callers import it from here
from braid.kernels import self_check
from braid.models.hybrid import IGNORE_INDEX, aux_loss
from braid.models.stats import ModelStats, model_stats, resolve_vocab
from braid.parallel.data_parallel import unwrap
from braid.parallel.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from braid.parallel.mesh import build_mesh, check_world
from braid.plan.auto import resolve_auto_layout
from braid.trainer.checkpoint import CheckpointManager
from braid.trainer.checkpoint_config import check_resume, checkpoint_info, describe
from braid.trainer.engine import engine_class
from braid.trainer.export import export_hf
from braid.trainer.health import LossHealth
from braid.trainer.metrics import MetricsLogger, StepProfiler, StepTimer, init_wandb
from braid.trainer.report import IntervalLog, banner
from braid.trainer.schedule import lr_at
from braid.trainer.stop import StopSignals
from braid.trainer.training_model import autocast_dtype, build_training_model


class Trainer:
    """Owns one run. ``Trainer(cfg).train()`` returns the per-step training losses it computed."""

    def __init__(self, cfg: Config, info: Optional[DistInfo] = None):
        self.cfg = cfg
        t, p = cfg.train, cfg.parallel
        self.info = info or init_distributed(cfg.train.device,
                                             single_process_group=engine_class(p.engine).single_process_group)
        # parallel.layout=auto: the planner's layout replaces the parallel keys before anything uses them
        cfg, self.layout_note = resolve_auto_layout(cfg, self.info.world_size, self.info.device)
        self.cfg, t, p = cfg, cfg.train, cfg.parallel
        self.dims = check_world(cfg, self.info.world_size)  # the checks launch/torchrun.sh runs before spawning
        # Before any data is read or file written: a resume that cannot continue this run costs one line.
        _, self.resume_change_note = check_resume(cfg)
        self.dp = self.dims.dp  # sample streams: dp_replicate × dp_shard (not tp/cp ranks)
        self.grad_accum = t.global_batch_size // (t.micro_batch_size * self.dp)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = self.info.device
        self.autocast_dtype = autocast_dtype(t.precision, self.device)
        self_check.configure(cfg.kernels.self_check)

        # Data before any file is written: a bad source fails with nothing on disk.
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        # The global batch lets streaming sources give each data-parallel rank only its own lanes.
        self.train_data, self.valid_data = build_datasets(cfg.data, self.tokenizer, progress=self.info.is_main,
                                                          seed=t.seed, global_batch_size=t.global_batch_size)
        self.order = SampleOrder(len(self.train_data), t.seed)

        torch.manual_seed(t.seed)
        self.model_cfg = resolve_vocab(cfg.model, self.tokenizer.vocab_size)
        self.stats: ModelStats = model_stats(self.model_cfg, cfg.data.seq_len)
        self.mesh = build_mesh(self.dims, self.device.type)
        # Losses and token counts are summed over data × context ranks; tensor ranks hold copies.
        self.loss_group = self.mesh.group("dp_cp")
        self.engine, self.init_notes = build_training_model(cfg, self.model_cfg, self.mesh, self.device,
                                                            self.autocast_dtype, self.grad_accum)
        self.model, self.optimizer = self.engine.model, self.engine.optimizer
        self.pipeline = None
        if self.dims.pp > 1:  # the micro-batches run through the stages' schedule (braid.parallel.pipeline)
            from braid.parallel.pipeline import Pipeline, describe_split

            self.pipeline = Pipeline(self.model, self.mesh, p, self.grad_accum, self.device, self.autocast_dtype,
                                     t.micro_batch_size, cfg.data.seq_len)
            self.init_notes.append("braid: " + describe_split(self.model_cfg, self.model.bounds, p.pp_schedule,
                                                              self.dims.pp, virtual_stages(p)))
        if self.model_cfg.connection == "ngpt":  # each parameter was drawn alone: put the matrices on the sphere
            from braid.trainer.ngpt_step import normalize_weights

            normalize_weights(unwrap(self.model))
        # Modules with per-step routing statistics (MoE) declare it; their aux losses and loads are logged.
        self.has_moe = any(getattr(m, "step_statistics", False) for m in unwrap(self.model).modules())
        if self.pipeline is not None:  # a stage without MoE layers still logs the run's aux loss
            flag = torch.tensor([float(self.has_moe)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.pipeline.group)
            self.has_moe = bool(flag.item())
        if t.qk_clip > 0:
            from braid.trainer import qk_clip

            qk_clip.enable(unwrap(self.model))
        self._aux: Optional[float] = None
        self._moe_metrics: dict = {}

        self.run_dir = cfg.run_dir
        layout = {"engine": p.engine, "world_size": self.info.world_size, "dp_replicate": self.dims.dp_replicate,
                  "dp_shard": self.dims.dp_shard, "cp": self.dims.cp, "tp": self.dims.tp, "ep": self.dims.ep,
                  "pp": self.dims.pp,
                  **self.engine.layout(p)}
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep, self.info, layout,
                                      verify=cfg.checkpoint.verify)
        self.step = 0
        self.consumed_samples = 0
        # A counter, not samples × seq_len: the batch size may change on resume and tokens only accumulate.
        self.consumed_tokens = 0
        self.skipped_iterations = 0
        self.nan_iterations = 0
        self.timer = StepTimer(self.device, t.timing_sync)
        self.interval_log = IntervalLog(cfg, self.stats, self.info, self.timer)
        self.health = LossHealth(t)
        self.resume_notes: list[str] = []  # checkpoints set aside by resume=auto, said once the logger exists
        self.logger: Optional[MetricsLogger] = None
        self.stopped_by: Optional[str] = None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---------------------------------------------------------------- state

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "skipped_iterations": self.skipped_iterations,
            "nan_iterations": self.nan_iterations,
            **self.interval_log.state(),
            "scheduler": {"kind": self.cfg.train.schedule, "step": self.step},
        }

    def _resume(self) -> Optional[Path]:
        spec = self.cfg.checkpoint.resume
        if spec == "none":
            return None
        if spec == "auto":
            path, state, self.resume_notes = self.ckpt.load_newest(self.model, self.optimizer, self.trainer_state())
        else:
            path, state = Path(spec), self.ckpt.load(Path(spec), self.model, self.optimizer, self.trainer_state())
        if state is not None:
            self._apply_state(state)
            saved = checkpoint_info(path).get("consumed_tokens")
            # Checkpoints before the counter was kept: data.seq_len cannot have changed since (check_resume).
            self.consumed_tokens = int(saved) if saved is not None else self.consumed_samples * self.cfg.data.seq_len
        return path

    def _apply_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.skipped_iterations = int(state["skipped_iterations"])
        self.nan_iterations = int(state["nan_iterations"])
        self.interval_log.load_state(state)

    def _prepare_run_dir(self) -> None:
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        barrier()

    # ---------------------------------------------------------------- steps

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, self.loss_group)

    def _batches(self, data, order: SampleOrder, start: int) -> list[dict]:
        t = self.cfg.train
        batches = micro_batches(data, order, start, t.global_batch_size, t.micro_batch_size, self.mesh.dp_rank,
                                self.dp, self.device, with_doc_ids=self.cfg.data.document_mask)
        cp = self.engine.module.context_parallel
        # Context ranks of one data stream read the same samples and keep their own positions.
        return batches if cp is None else [cp.shard_batch(b) for b in batches]

    def _forward_loss_sum(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            loss = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                         doc_ids=batch.get("doc_ids"))
        tokens = (batch["labels"] != IGNORE_INDEX).sum()
        return loss.sum(), tokens

    def train_step(self) -> float:
        """One optimizer step over a global batch; returns the global mean per-token loss."""
        t, timer = self.cfg.train, self.timer
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with timer("data"):
            batches = self._batches(self.train_data, self.order, self.consumed_samples)
            # Normalise by the tokens of the whole global batch, so every rank/micro-batch split agrees.
            local_tokens = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches).to(torch.float64)
        with timer("comm"):
            global_tokens = self._all_reduce(local_tokens.clone()).item()
        poisoned = self.step + 1 in t.debug_nan_steps
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.model.train()
        if self.pipeline is not None:
            factor = self.engine.loss_factor * (float("nan") if poisoned else 1.0)
            with timer("forward"):  # forward and backward interleave in the schedule
                loss_sum, aux_sum = self._pipeline_sums(batches, global_tokens, factor)
            batches = []
        for batch in batches:
            with timer("forward"):
                micro_sum, micro_tokens = self._forward_loss_sum(self.model, batch)
                if poisoned:  # train.debug_nan_steps: a diverged step as everything downstream sees it
                    micro_sum = micro_sum * float("nan")
                objective = micro_sum / global_tokens
                aux = aux_loss(self.engine.module)
                if aux is not None:  # a per-micro-batch mean: weight it by the micro-batch's token share
                    weighted_aux = aux * (micro_tokens / global_tokens)
                    objective = objective + weighted_aux
                    aux_sum += weighted_aux.detach().to(torch.float64)
            with timer("backward"):
                self.engine.backward(objective)
            if self.engine.steps_in_micro_batch:
                with timer("optimizer"):
                    self.engine.after_micro_batch()
            loss_sum += micro_sum.detach().to(torch.float64)
        with timer("comm"):
            loss = self._all_reduce(loss_sum).item() / global_tokens
            self._aux = self._all_reduce(aux_sum).item() if self.has_moe else None
        with timer("optimizer"):
            grad_norm, updated = self._optimizer_step(loss)
        self.health.count(updated)  # an update is skipped exactly when the loss or gradients are non-finite
        timer.steps += 1
        self.step += 1
        self.consumed_samples += t.global_batch_size
        self.consumed_tokens += t.global_batch_size * self.cfg.data.seq_len
        self._last = {"lr": lr, "grad_norm": grad_norm if math.isfinite(grad_norm) else None}
        return loss

    def _pipeline_sums(self, batches: list[dict], global_tokens: float,
                       factor: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and weighted aux sums of this data stream (made on the stages that hold them), on every
        pipeline rank; ``factor`` None: evaluation (forward only)."""
        if factor is None:
            loss_sum, aux_sum = self.pipeline.evaluate(batches), torch.zeros((), dtype=torch.float64)
            factor = 1.0
        else:
            loss_sum, aux_sum = self.pipeline.run(batches, global_tokens, factor)
        if factor != factor:  # train.debug_nan_steps
            loss_sum = loss_sum * float("nan")
        both = torch.stack([loss_sum.to(self.device, torch.float64), aux_sum.to(self.device, torch.float64)])
        torch.distributed.all_reduce(both, group=self.pipeline.group)
        return both[0], both[1]

    def _optimizer_step(self, loss: float) -> tuple[float, bool]:
        """Clip and step unless the loss or gradients are non-finite (then count the skip); the grad norm
        and whether the weights were updated."""
        grad_norm, updated = self.engine.step(loss)
        if self.cfg.train.qk_clip > 0:  # after the step, on every rank alike (the maxima are reduced)
            self._qk_clip(updated)
        if updated and self.model_cfg.connection == "ngpt":  # back onto the sphere after each step
            from braid.trainer.ngpt_step import normalize_weights

            normalize_weights(unwrap(self.model))
        if updated:
            if self.has_moe:  # aux-loss-free balancing: once per optimizer step, loads summed over ranks
                from braid.models.moe import moe_step

                self._moe_metrics = moe_step(self.engine.module, all_reduce=self._all_reduce)
        else:  # Megatron semantics: the iteration counts, the update is skipped.
            self.skipped_iterations += 1
            self.nan_iterations += int(not math.isfinite(loss))
            for module in self.model.modules():  # a skipped batch must not steer expert balancing
                if hasattr(module, "load_counts"):
                    module.load_counts.zero_()
        self.engine.zero_grad()
        return grad_norm, updated

    def _qk_clip(self, updated: bool) -> None:
        from braid.trainer import qk_clip

        model = unwrap(self.model)
        if not updated:
            qk_clip.reset(model)
            return

        def reduce_max(x: torch.Tensor) -> torch.Tensor:
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=self.loss_group)
            return x

        qk_clip.qk_clip(model, self.cfg.train.qk_clip, reduce_max)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean per-token loss over ``eval_iters`` global batches of the held-out split (dp-invariant)."""
        t = self.cfg.train
        model = self.model  # through FSDP2 / DeepSpeed: sharded parameters are gathered per block
        model.eval()
        order = SampleOrder(len(self.valid_data), t.seed, shuffle=False)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        for it in range(t.eval_iters):
            batches = self._batches(self.valid_data, order, it * t.global_batch_size)
            if self.pipeline is not None:
                loss_sum += self._pipeline_sums(batches, 1.0, None)[0]
                tokens += sum((b["labels"] != IGNORE_INDEX).sum() for b in batches).to(torch.float64)
                batches = []
            for batch in batches:
                s, n = self._forward_loss_sum(model, batch)
                loss_sum += s.to(torch.float64)
                tokens += n.to(torch.float64)
        return (self._all_reduce(loss_sum) / self._all_reduce(tokens)).item()

    # ---------------------------------------------------------------- loop

    def _log_step(self, loss: float, seconds: float) -> None:
        if self.interval_log.add(self.step, loss, seconds):
            moe = {"aux_loss": self._aux, **self._stage_moe_metrics()} if self.has_moe else {}
            self.interval_log.flush(self.logger, self.step, self._last["lr"], self._last["grad_norm"],
                                    self.consumed_samples, self.consumed_tokens, self.skipped_iterations,
                                    self.nan_iterations, moe)

    def _stage_moe_metrics(self) -> dict:
        """The per-layer MoE metrics of every stage (each pp rank made its own layers'), in layer order."""
        if self.pipeline is None:
            return self._moe_metrics
        parts = [None] * self.dims.pp
        torch.distributed.all_gather_object(parts, self._moe_metrics, group=self.pipeline.group)
        merged = {k: v for part in parts for k, v in part.items()}
        return dict(sorted(merged.items(), key=lambda kv: (int(kv[0].split("/")[1].removeprefix("layer")), kv[0])))

    def _banner(self, resumed: Optional[Path]) -> None:
        self.logger.console(banner(self.cfg, self.info, self.model_cfg, self.stats, self.train_data, self.valid_data,
                                   self.grad_accum, self.dims) + (f" | {self.layout_note}" if self.layout_note else ""))
        notes = self.init_notes + self.resume_notes + ([self.resume_change_note] if self.resume_change_note else [])
        for note in notes:
            self.logger.console(note)
        if resumed is not None:
            self.logger.console(f"braid: resumed from {resumed} at iteration {self.step} "
                                f"({self.consumed_samples} samples consumed)")

    def _save(self) -> None:
        if self.health.nan_streak:  # the state may be poisoned (DeepSpeed applies such updates): keep the last good one
            self.logger.console(f" not saving a checkpoint at iteration {self.step}: its step was non-finite")
            return
        about = describe(self.cfg, self.step, self.consumed_samples, self.consumed_tokens, self.ckpt.layout)
        path = self.ckpt.save(self.step, self.model, self.optimizer, self.trainer_state(), about)
        self.logger.console(f" saved checkpoint {path}")

    def _should_stop(self, signals: StopSignals) -> bool:
        return signals.agreed(self.device)

    def train(self) -> list[float]:
        """Train to ``train.steps``, or until SIGTERM/SIGUSR1 (then checkpoint and return early)."""
        cfg, t = self.cfg, self.cfg.train
        # The run dir's config.yaml is written only once the checkpoint has loaded into this model.
        resumed = self._resume()
        self._prepare_run_dir()
        wandb_run = None
        if self.info.is_main and cfg.logging.wandb != "off":
            wandb_run = init_wandb(self.run_dir, cfg.logging.wandb, cfg.logging.wandb_project,
                                   cfg.logging.wandb_entity, cfg.run.name, dataclasses.asdict(cfg))
        self.logger = MetricsLogger(self.run_dir, self.info.is_main, wandb_run)
        self.logger.truncate_after(self.step)
        self._banner(resumed)
        losses: list[float] = []
        profiler = StepProfiler(self.run_dir, self.info.rank, self.device, t.profile_steps, t.memory_snapshot_step,
                                self.timer, self.logger.console)
        profiler.start(self.step)
        signals = StopSignals().install()
        try:
            while self.step < t.steps:
                profiler.before_step(self.step + 1)
                start = time.perf_counter()
                loss = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                losses.append(loss)
                self._log_step(loss, time.perf_counter() - start)
                profiler.after_step(self.step)
                batch = range(self.consumed_samples - t.global_batch_size, self.consumed_samples)
                self.health.check_spike(self.step, loss, batch, self.order, self.logger)
                self.health.check_nan_streak(self.step, self.ckpt.root)
                if self.step % t.eval_interval == 0 or self.step == t.steps:
                    eval_loss = self.evaluate()
                    self.logger.console(self.logger.eval_line(self.step, eval_loss))
                    self.logger.write({"step": self.step, "eval_loss": eval_loss,
                                       "eval_ppl": math.exp(min(eval_loss, 50.0))})
                stop = self._should_stop(signals)
                if self.step % cfg.checkpoint.interval == 0 or self.step == t.steps or stop:
                    self._save()
                if stop:
                    self.stopped_by = signals.reason()
                    self.logger.console(f"braid: stopping at iteration {self.step} on {self.stopped_by}; "
                                        "resume with checkpoint.resume=auto")
                    return losses
        finally:
            profiler.close(self.step)
            signals.restore()
            if wandb_run is not None:
                wandb_run.finish()
        export_hf(cfg.checkpoint.export_hf, self.run_dir, self.ckpt.root, self.step, self.info, self.logger.console)
        self.logger.console(f"braid: done at iteration {self.step}; run dir {self.run_dir}")
        return losses
