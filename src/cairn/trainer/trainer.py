"""The training loop: it moves time forward, runs the model, and fires events. Everything else is a callback."""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from cairn.checkpoint.keys import check_ignore_keys
from cairn.checkpoint.naming.checks import bidi_controls, check_names, control_characters
from cairn.checkpoint.resume import check_autoresume_names, restore, saving_from_arguments
from cairn.checkpoint.save.retention_arguments import check_retention_arguments
from cairn.checkpoint.save.saver import CheckpointSaver
from cairn.core.callback import Algorithm, Callback
from cairn.core.engine import Engine
from cairn.core.event import Event
from cairn.core.interval import IntervalLike, interval_policy
from cairn.core.logger import Logger, LoggerDestination, transfers_among
from cairn.core.state import State
from cairn.core.time import Time, TimeUnit, ensure_time
from cairn.loggers.progress_bar import ProgressBarLogger
from cairn.loggers.remote_uploader_downloader import RemoteUploaderDownloader
from cairn.storage.base import ObjectStore
from cairn.trainer.agreement import settle_checkpoint_event
from cairn.trainer.batching import split_batch
from cairn.trainer.dataloader import epoch_iterator, record_loader_position, restore_loader_position
from cairn.trainer.devices import move_to_device, resolve_device
from cairn.trainer.distributed import init_from_environment, parse_parallelism_config, shard_dataloader, wrap_model
from cairn.trainer.model_adapter import ModelAdapter
from cairn.trainer.precision import autocast, make_grad_scaler, parse_precision
from cairn.trainer.preemption import (
    DEFAULT_PREEMPTION_EXIT_CODE,
    DEFAULT_PREEMPTION_SIGNALS,
    Preempted,
    PreemptionWatch,
    SignalLike,
    preemption_watch,
)
from cairn.trainer.run_name import generate_run_name
from cairn.utils.arguments import check_flag
from cairn.utils.dist import broadcast_object, get_rank, is_distributed
from cairn.utils.reproducibility import MAX_SEED, make_seed, rank_seed, seed_all

__all__ = ["Trainer"]

log = logging.getLogger(__name__)

_MAX_DURATION_UNITS = (TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN)
_SCHEDULER_METHODS = ("step", "state_dict", "load_state_dict")  # stepped after each batch, and checkpointed
_FLAGS = (  # the yes/no arguments, checked in this order
    "progress_bar",
    "save_overwrite",
    "save_weights_only",
    "save_async",
    "save_incremental",
    "load_weights_only",
    "load_strict_model_weights",
    "load_progress_bar",
    "load_at_epoch_boundary",
    "autoresume",
    "save_on_preemption",
)


class Trainer:
    """Trains ``model`` on ``train_dataloader`` until ``max_duration``.

    Defaults worth knowing: the optimizer is ``torch.optim.AdamW(lr=1e-3)`` (it trains most small models well
    without tuning); schedulers step after every batch; precision is fp32 unless asked; the device is the GPU
    when one is visible. See ``docs/`` for the full guide.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        train_dataloader: Iterable[Any],
        max_duration: int | str | Time[Any],
        eval_dataloader: Iterable[Any] | None = None,
        eval_interval: IntervalLike = "1ep",
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        schedulers: Any | Sequence[Any] | None = None,
        device: str | torch.device | None = None,
        precision: str | None = None,
        device_train_microbatch_size: int | None = None,
        seed: int | None = None,
        run_name: str | None = None,
        callbacks: Callback | Sequence[Callback] | None = None,
        loggers: LoggerDestination | Sequence[LoggerDestination] | None = None,
        algorithms: Algorithm | Sequence[Algorithm] | None = None,
        progress_bar: bool = True,
        parallelism_config: dict[str, Any] | None = None,
        # saving (docs/checkpointing.md, "Saving"): they build one CheckpointSaver
        save_folder: str | None = None,
        save_filename: str = "ep{epoch}-ba{batch}-rank{rank}.pt",
        save_latest_filename: str | None = "latest-rank{rank}.pt",
        save_overwrite: bool = False,
        save_interval: IntervalLike = "1ep",
        save_weights_only: bool = False,
        save_num_checkpoints_to_keep: int = -1,
        save_remote_file_name: str | None = None,
        save_ignore_keys: Sequence[str] | None = None,
        save_async: bool = False,
        save_keep_best: int = 0,
        save_best_metric: str | None = None,
        save_best_mode: str = "max",
        save_best_filename: str | None = "best-rank{rank}.pt",
        save_keep_every: str | Time[Any] | None = None,
        save_remote_num_checkpoints_to_keep: int = -1,
        save_incremental: bool = False,
        # loading and resuming (docs/checkpointing.md, "Loading and resuming")
        load_path: str | None = None,
        load_object_store: ObjectStore | LoggerDestination | None = None,
        load_weights_only: bool = False,
        load_strict_model_weights: bool = True,
        load_ignore_keys: Sequence[str] | None = None,
        load_progress_bar: bool = True,
        load_at_epoch_boundary: bool = False,
        autoresume: bool = False,
        # stopping cleanly (docs/checkpointing.md#preemption)
        save_on_preemption: bool = False,
        preemption_signals: SignalLike | Sequence[SignalLike] = DEFAULT_PREEMPTION_SIGNALS,
        preemption_exit_code: int = DEFAULT_PREEMPTION_EXIT_CODE,
    ) -> None:
        args = _checked_arguments(**{name: value for name, value in locals().items() if name != "self"})
        fsdp = parse_parallelism_config(args.parallelism_config)
        self._model = ModelAdapter(args.model)
        device = init_from_environment(resolve_device(args.device))
        rank_zero_seed = _seed_every_rank(args.seed)
        args.model.to(device)
        optimizers = _checked_optimizers(args.optimizers, args.model)  # before FSDP2 replaces the parameters
        self._model.forward_module = wrap_model(args.model, device, fsdp, optimizers)  # DDP, or FSDP2 shards
        train_dataloader = shard_dataloader(args.train_dataloader, rank_zero_seed)
        eval_dataloader = shard_dataloader(args.eval_dataloader, rank_zero_seed)
        self._precision = parse_precision(args.precision)
        destinations = _destinations(args.loggers, progress_bar=args.progress_bar)
        saver, upload_bucket = saving_from_arguments(args.save_folder, **_saving_keywords(args))
        destinations.extend(_uploader_for(upload_bucket))  # a URI save_folder uploads
        with self._released_on_failure(destinations):
            check_autoresume_names(saver, destinations, autoresume=args.autoresume, run_name=args.run_name)
            self.state = self._new_state(args, device, rank_zero_seed, optimizers, saver, destinations)
            self._preemption = self._preemption_watch(args)
            self._attach_loaders(train_dataloader, eval_dataloader, fsdp)
            self._eval_due = interval_policy(
                args.eval_interval, batch_event=Event.BATCH_END, epoch_event=Event.EPOCH_END, name="eval_interval"
            )
            self.logger = Logger(self.state, destinations)
            self.engine = Engine(self.state, self.logger)
            self.engine.run_event(Event.INIT)
            restore(self.state, saver=saver, destinations=destinations, **_loading_keywords(args))
            self._resume_point = restore_loader_position(
                train_dataloader, self.state, at_epoch_boundary=args.load_at_epoch_boundary
            )
            if self._resume_point is not None and self._resume_point.epoch_length is not None:
                self.state.dataloader_len = self._resume_point.epoch_length  # the re-split epoch's, on these ranks
            self._show_replay = args.progress_bar and get_rank() == 0
            self.logger.log_hyperparameters(self._hyperparameters())

    @contextlib.contextmanager
    def _released_on_failure(self, destinations: Sequence[LoggerDestination]) -> Iterator[None]:
        """A constructor that raises leaves the caller no trainer to ``close()``: release here what was built (the
        callbacks and loggers once the engine exists, else the uploaders' workers, stores and staging folders), and
        raise the original error, never one from the cleanup (that one is logged)."""
        try:
            yield
        except BaseException:
            engine: Engine | None = getattr(self, "engine", None)
            transfers = transfers_among(destinations)
            closers = [engine.close] if engine is not None else [t.close for t in transfers]
            for close in closers:
                try:
                    close()
                except Exception as err:  # noqa: BLE001 - the construction's own error is the one to raise
                    log.warning("releasing what the failed Trainer construction had built failed too: %s", err)
            raise

    def _new_state(
        self,
        args: SimpleNamespace,
        device: torch.device,
        rank_zero_seed: int,
        optimizers: list[torch.optim.Optimizer],
        saver: CheckpointSaver | None,
        destinations: list[LoggerDestination],
    ) -> State:
        """The run's state; its run name is checked (or made up) here, after the saving checks, as it always was."""
        model = args.model
        return State(
            model=model,
            run_name=broadcast_object(generate_run_name() if args.run_name is None else _check_run_name(args.run_name)),
            rank_zero_seed=rank_zero_seed,
            max_duration=_parse_max_duration(args.max_duration),
            device=device,
            precision=self._precision.value,
            optimizers=optimizers or [_default_optimizer(model)],
            schedulers=_check_schedulers(args.schedulers),
            algorithms=_as_list(args.algorithms, Algorithm, "algorithms"),
            # the saver before the loggers: at FIT_END its last async save reaches the uploaders before they wait
            callbacks=[*_as_list(args.callbacks, Callback, "callbacks"), *([saver] if saver else []), *destinations],
            scaler=make_grad_scaler(self._precision, device),
            train_metrics=_on_device(self._model.metrics(is_train=True), device),
            eval_metrics={"eval": _on_device(self._model.metrics(is_train=False), device)},
            device_train_microbatch_size=_check_microbatch_size(args.device_train_microbatch_size),
        )

    def _preemption_watch(self, args: SimpleNamespace) -> PreemptionWatch | None:
        """The signal watch ``save_on_preemption`` asks for; refused when no saver (``save_folder`` or a
        ``CheckpointSaver`` among the callbacks) could write the checkpoint it promises."""
        if args.save_on_preemption and not self._savers():
            raise ValueError("save_on_preemption=True needs somewhere to save: pass save_folder (or a CheckpointSaver)")
        return preemption_watch(args.save_on_preemption, args.preemption_signals, args.preemption_exit_code)

    def _attach_loaders(
        self, train_dataloader: Iterable[Any], eval_dataloader: Iterable[Any] | None, fsdp: dict[str, Any] | None
    ) -> None:
        self.state.sharded_checkpoints = bool(fsdp and fsdp["state_dict_type"] == "sharded" and is_distributed())
        self.state.train_dataloader = train_dataloader
        self.state.eval_dataloader = eval_dataloader
        self.state.dataloader_len = _len_or_none(train_dataloader)

    @property
    def saved_checkpoints(self) -> list[str]:
        """Paths of the checkpoints this trainer's savers wrote, in the order written, as given (folder/filename)."""
        saves = [
            pair for saver in self._savers() for pair in zip(saver.save_order, saver.saved_checkpoints, strict=True)
        ]
        return [path for _, path in sorted(saves)]

    def _savers(self) -> list[CheckpointSaver]:
        return [c for c in self.state.callbacks if isinstance(c, CheckpointSaver)]

    # -- public -----------------------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train until ``max_duration``; a trainer that already reached it returns at once."""
        state = self.state
        self.engine.run_event(Event.FIT_START)
        state.model.train()
        started_at = (int(state.timestamp.epoch), int(state.timestamp.batch))
        with self._preemption.installed() if self._preemption else contextlib.nullcontext():
            try:
                while not state.is_done():
                    if not self._train_epoch():
                        break
                    self._check_preemption()  # a signal during the epoch's end (evaluation, checkpoint) stops here
            except Preempted:
                self._save_for_preemption(started_at)
            # still watching: a signal now lets FIT_END finish waiting for the last writes and uploads
            self.engine.run_event(Event.FIT_END)
            if self._preemption is not None and self._preemption.seen():
                self.close()
                self._preemption.exit()

    def _check_preemption(self) -> None:
        if self._preemption is not None:
            self._preemption.check()

    def _save_for_preemption(self, started_at: tuple[int, int]) -> None:
        """Checkpoint the step just finished (FIT_END then waits for the write and uploads, and ``fit`` exits with
        ``preemption_exit_code``); a run stopped before it trained anything has nothing new to save."""
        timestamp = self.state.timestamp
        if (int(timestamp.epoch), int(timestamp.batch)) == started_at:
            return
        assert self.state.train_dataloader is not None
        record_loader_position(self.state.train_dataloader, self.state)
        for saver in self._savers():
            saver.save_unless_saved(self.state, self.logger)
        log.warning("preempted: checkpoint of batch %d saved", int(timestamp.batch))

    def eval(self) -> dict[str, float]:
        """Evaluate on ``eval_dataloader`` now and return the metrics, as logged."""
        if self.state.eval_dataloader is None:
            raise ValueError("Trainer.eval() needs an eval_dataloader; pass one to the Trainer")
        return self._evaluate()

    def close(self) -> None:
        """Let every callback and logger release what it holds (progress bars, files, background workers)."""
        self.engine.close()

    # -- the loop ---------------------------------------------------------------------------------------------

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; return False when the loader yielded nothing at all."""
        state = self.state
        if state.timestamp.batch_in_epoch == 0:
            _reset(state.train_metrics.values())
        self.engine.run_event(Event.EPOCH_START)
        ran_any = False
        for batch in self._batches():
            ran_any = True
            self._train_batch(batch)
            if state.is_done() and not state.is_epoch_exhausted():
                return True
        if not ran_any and state.timestamp.batch_in_epoch == 0:
            log.warning("train_dataloader yielded no batches; stopping instead of looping forever")
            return False
        self._end_epoch()
        return True

    def _batches(self) -> Iterator[Any]:
        """The epoch's batches, on the device, with the dataloader events around each fetch."""
        state = self.state
        assert state.train_dataloader is not None
        self._check_preemption()  # before the iterator draws the epoch's shuffle: a signal in EPOCH_START stops here
        if state.is_epoch_exhausted():
            return  # resumed from the last batch of an epoch: only its end remains
        iterator = epoch_iterator(state.train_dataloader, state, self._resume_point, show_progress=self._show_replay)
        self._resume_point = None  # the first epoch only
        while not state.is_epoch_exhausted():
            self.engine.run_event(Event.BEFORE_DATALOADER)
            try:
                batch = next(iterator)
            except StopIteration:
                return
            state.batch = move_to_device(batch, state.device)
            self.engine.run_event(Event.AFTER_DATALOADER)
            yield state.batch
            self._check_preemption()  # the step is done, its evaluation and checkpoint included

    def _train_batch(self, batch: Any) -> None:
        state = self.state
        started = time.perf_counter()
        self.engine.run_event(Event.BATCH_START)
        samples, tokens = self._model.count_samples(batch), self._model.count_tokens(batch)
        if state.max_duration.unit is TimeUnit.TOKEN and tokens == 0:
            raise ValueError(
                f"max_duration={state.max_duration} counts tokens, but this batch holds none; give batches an "
                "'input_ids' tensor or give the model a num_tokens(batch) method"
            )
        self.engine.run_event(Event.BEFORE_TRAIN_BATCH)
        loss = self._optimizer_step(batch, samples)
        state.batch = batch
        self.engine.run_event(Event.AFTER_TRAIN_BATCH)
        state.advance(state.timestamp.to_next_batch(samples, tokens, time.perf_counter() - started))
        self.logger.log_metrics({"loss/train/total": float(loss)})
        self.engine.run_event(Event.BATCH_END)
        if self._eval_due(state, Event.BATCH_END):
            self._evaluate()
        self._checkpoint_event(Event.BATCH_CHECKPOINT)

    def _optimizer_step(self, batch: Any, samples: int) -> torch.Tensor:
        """One update from one batch, cut into microbatches whose gradients add up to the whole batch's."""
        state = self.state
        for optimizer in state.optimizers:
            optimizer.zero_grad(set_to_none=True)
        size = state.device_train_microbatch_size
        microbatches = split_batch(batch, size) if size and size < samples else [batch]
        total = torch.zeros((), device=state.device)
        for microbatch in microbatches:
            weight = self._model.count_samples(microbatch) / samples
            total += self._forward_backward(microbatch, weight)
        for optimizer in state.optimizers:
            if state.scaler is not None:
                state.scaler.step(optimizer)
            else:
                optimizer.step()
        if state.scaler is not None:
            state.scaler.update()
        for scheduler in state.schedulers:
            scheduler.step()
        return total

    def _forward_backward(self, microbatch: Any, weight: float) -> torch.Tensor:
        """Forward, loss and backward for one microbatch; the loss is scaled by its share of the batch."""
        state, engine = self.state, self.engine
        state.batch = microbatch
        engine.run_event(Event.BEFORE_FORWARD)
        with autocast(self._precision, state.device):
            state.outputs = self._model.forward(microbatch)
        engine.run_event(Event.AFTER_FORWARD)
        engine.run_event(Event.BEFORE_LOSS)
        with autocast(self._precision, state.device):
            loss, parts = self._model.loss(state.outputs, microbatch)
        state.loss = loss
        engine.run_event(Event.AFTER_LOSS)
        engine.run_event(Event.BEFORE_BACKWARD)
        scaled = state.loss * weight
        (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
        engine.run_event(Event.AFTER_BACKWARD)
        with torch.no_grad():
            for metric in state.train_metrics.values():
                self._model.update_metric(microbatch, _detached(state.outputs), metric)
        if parts:
            self.logger.log_metrics({f"loss/train/{name}": float(value) for name, value in parts.items()})
        return state.loss.detach().float() * weight

    def _end_epoch(self) -> None:
        state = self.state
        if state.train_metrics:
            self.logger.log_metrics(_computed("metrics/train/", state.train_metrics))
        state.advance(state.timestamp.to_next_epoch())
        state.dataloader_len = _len_or_none(state.train_dataloader)  # a re-split epoch's length was its own
        self.engine.run_event(Event.EPOCH_END)
        if self._eval_due(state, Event.EPOCH_END):
            self._evaluate()
        self._checkpoint_event(Event.EPOCH_CHECKPOINT)

    def _checkpoint_event(self, event: Event) -> None:
        assert self.state.train_dataloader is not None
        record_loader_position(self.state.train_dataloader, self.state)
        settle_checkpoint_event(self.state, event, self._savers(), self._preemption)  # one collective at most
        self.engine.run_event(event)

    def _evaluate(self) -> dict[str, float]:
        state, engine = self.state, self.engine
        if state.eval_dataloader is None:
            return {}
        metrics = state.eval_metrics["eval"]
        _reset(metrics.values())
        was_training = state.model.training
        state.model.eval()
        state.eval_label = "eval"
        engine.run_event(Event.EVAL_START)
        with torch.no_grad():
            for batch in state.eval_dataloader:
                state.batch = move_to_device(batch, state.device)
                engine.run_event(Event.EVAL_BATCH_START)
                engine.run_event(Event.EVAL_BEFORE_FORWARD)
                with autocast(self._precision, state.device):
                    state.outputs = self._model.eval_outputs(state.batch)
                engine.run_event(Event.EVAL_AFTER_FORWARD)
                for metric in metrics.values():
                    self._model.update_metric(state.batch, state.outputs, metric)
                engine.run_event(Event.EVAL_BATCH_END)
        results = _computed("metrics/eval/", metrics)
        self.logger.log_metrics(results)
        engine.run_event(Event.EVAL_END)
        state.eval_label = None
        state.model.train(was_training)
        return results

    def _hyperparameters(self) -> dict[str, Any]:
        state = self.state
        return {
            "run_name": state.run_name,
            "seed": state.rank_zero_seed,
            "max_duration": str(state.max_duration),
            "device": str(state.device),
            "precision": state.precision,
            "device_train_microbatch_size": state.device_train_microbatch_size,
            "optimizers": [type(o).__name__ for o in state.optimizers],
        }


def _parse_max_duration(value: int | str | Time[Any]) -> Time[Any]:
    duration = ensure_time(value, name="max_duration")
    if duration.unit not in _MAX_DURATION_UNITS:
        units = ", ".join(u.value for u in _MAX_DURATION_UNITS)
        raise ValueError(f"max_duration={value!r}: a run's length is counted in {units}, not {duration.unit.value}")
    if duration.value <= 0:
        raise ValueError(f"max_duration={value!r}: must be greater than zero")
    return duration


def _default_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters, so there is nothing to optimize")
    return torch.optim.AdamW(params, lr=1e-3)


def _as_list(value: Any, kind: type, name: str) -> list[Any]:
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, kind):
            raise TypeError(f"{name}: expected {kind.__name__} objects, got {type(item).__name__}")
    return items


def _checked_arguments(**given: Any) -> SimpleNamespace:
    """Every ``Trainer`` argument by name, the cheap checks done (before any training time is spent) and their
    values normalised: the yes/no flags as real ``bool`` (``save_overwrite="False"`` would overwrite), the loaders
    iterable, the save names and the ignore keys in their checked form."""
    args = SimpleNamespace(**given)
    for name in _FLAGS:
        setattr(args, name, check_flag(getattr(args, name), argument=name))
    _check_loaders(train_dataloader=args.train_dataloader, eval_dataloader=args.eval_dataloader)
    if args.save_folder is not None:  # checked first, under the Trainer's argument names (the saver checks them again)
        args.save_folder, args.save_filename, args.save_latest_filename, args.save_remote_file_name, _ = check_names(
            args.save_folder, args.save_filename, args.save_latest_filename, args.save_remote_file_name, prefix="save_"
        )
        check_retention_arguments(  # under the Trainer's names; the saver checks them again
            keep_best=args.save_keep_best,
            best_metric=args.save_best_metric,
            best_mode=args.save_best_mode,
            best_filename=args.save_best_filename,
            keep_every=args.save_keep_every,
            remote_num_checkpoints_to_keep=args.save_remote_num_checkpoints_to_keep,
            filename=args.save_filename,
            latest_filename=args.save_latest_filename,
            prefix="save_",
        )
    args.save_ignore_keys = check_ignore_keys(args.save_ignore_keys, argument="save_ignore_keys", loading=False)
    args.load_ignore_keys = check_ignore_keys(args.load_ignore_keys, argument="load_ignore_keys", loading=True)
    return args


def _seed_every_rank(seed: int | None) -> int:
    """Seed this rank's generators from the run's seed (rank 0's, shared); return that seed."""
    rank_zero_seed = broadcast_object(make_seed() if seed is None else _check_seed(seed))
    seed_all(rank_seed(rank_zero_seed, get_rank()))
    return rank_zero_seed


def _checked_optimizers(optimizers: Any, model: nn.Module) -> list[torch.optim.Optimizer]:
    optimizer_list = _as_list(optimizers, torch.optim.Optimizer, "optimizers")
    _refuse_optimizers_that_need_a_closure(optimizer_list)
    _refuse_optimizers_outside_the_model(optimizer_list, model)
    return optimizer_list


def _uploader_for(bucket_uri: str | None) -> list[LoggerDestination]:
    """The uploader a URI ``save_folder`` adds to the loggers, if any. Threads, not processes: uploads wait on the
    network, and spawned workers would re-run a user's script."""
    return [] if bucket_uri is None else [RemoteUploaderDownloader(bucket_uri, use_procs=False)]


def _destinations(loggers: Any, *, progress_bar: bool) -> list[LoggerDestination]:
    destinations = _as_list(loggers, LoggerDestination, "loggers")
    if progress_bar:
        destinations.append(ProgressBarLogger())
    return destinations


def _saving_keywords(args: SimpleNamespace) -> dict[str, Any]:
    """The ``save_*`` arguments under the names :func:`saving_from_arguments` takes."""
    return {
        "save_filename": args.save_filename,
        "save_remote_file_name": args.save_remote_file_name,
        "latest_filename": args.save_latest_filename,
        "save_interval": args.save_interval,
        "weights_only": args.save_weights_only,
        "num_checkpoints_to_keep": args.save_num_checkpoints_to_keep,
        "overwrite": args.save_overwrite,
        "ignore_keys": args.save_ignore_keys,
        "async_save": args.save_async,
        "keep_best": args.save_keep_best,
        "best_metric": args.save_best_metric,
        "best_mode": args.save_best_mode,
        "best_filename": args.save_best_filename,
        "keep_every": args.save_keep_every,
        "remote_num_checkpoints_to_keep": args.save_remote_num_checkpoints_to_keep,
        "incremental": args.save_incremental,
    }


def _loading_keywords(args: SimpleNamespace) -> dict[str, Any]:
    """The ``load_*`` arguments and ``autoresume`` under the names :func:`restore` takes."""
    return {
        "load_path": args.load_path,
        "load_object_store": args.load_object_store,
        "weights_only": args.load_weights_only,
        "strict": args.load_strict_model_weights,
        "ignore_keys": args.load_ignore_keys,
        "autoresume": args.autoresume,
        "progress": args.load_progress_bar,
    }


def _check_loaders(**loaders: object) -> None:
    """A loader that cannot be iterated would fail only when first used: an eval loader perhaps an epoch later."""
    for name, loader in loaders.items():
        if loader is None and name != "train_dataloader":
            continue
        if isinstance(loader, (str, bytes)) or not (hasattr(loader, "__iter__") or hasattr(loader, "__getitem__")):
            what = "a path, not a loader" if isinstance(loader, (str, bytes)) else "not iterable"
            raise TypeError(
                f"{name}={loader!r} is {what}; pass a torch DataLoader or another iterable that yields batches"
            )


def _check_schedulers(schedulers: Any) -> list[Any]:
    """The loop calls ``step()`` after every batch and each checkpoint stores ``state_dict()`` (a resume calls
    ``load_state_dict``): a scheduler lacking one would fail at the first batch or the first checkpoint."""
    items = _as_list(schedulers, object, "schedulers")
    for scheduler in items:
        missing = [name for name in _SCHEDULER_METHODS if not callable(getattr(scheduler, name, None))]
        if missing:
            raise TypeError(
                f"schedulers: {scheduler!r} has no {', '.join(missing)} method; pass learning-rate schedulers such as "
                "torch.optim.lr_scheduler.LambdaLR"
            )
        needed = _required_parameters(scheduler.step)
        if needed:
            raise ValueError(
                f"schedulers: {scheduler!r}.step() needs {', '.join(needed)}, and the Trainer calls it after each "
                "batch with no arguments; step it from a callback instead"
            )
    return items


def _required_parameters(function: Any) -> list[str]:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: let it be
        return []
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in plain and p.default is inspect.Parameter.empty]


def _refuse_optimizers_outside_the_model(optimizers: Sequence[torch.optim.Optimizer], model: nn.Module) -> None:
    """An optimizer over another model's parameters would step every batch and never change this model. One with
    some parameters outside it (a learnable temperature kept beside the model) is fine."""
    own = {id(parameter) for parameter in model.parameters()}
    for index, optimizer in enumerate(optimizers):
        if not any(id(p) in own for group in optimizer.param_groups for p in group["params"]):
            raise ValueError(
                f"optimizers[{index}]={type(optimizer).__name__} holds none of the model's parameters, so training "
                "would never change the model; build it from model.parameters()"
            )


def _check_seed(seed: int) -> int:
    """A seed outside what every generator takes would be folded into range silently: two seeds, one run."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} is a {type(seed).__name__}; use an integer from 0 to {MAX_SEED}, or None")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r}: use an integer from 0 to {MAX_SEED}, or None for a fresh one")
    return seed


def _check_run_name(run_name: str) -> str:
    """A run name is written into every checkpoint and read back as a string: another type would make files that
    no loader accepts, and an empty one used to be replaced by a new random name at every restart, so autoresume
    never found the run again."""
    if not isinstance(run_name, str):
        kind = type(run_name).__name__
        raise TypeError(f"run_name={run_name!r} is a {kind}; give a str, or None for a generated one")
    if not run_name.strip():
        raise ValueError(f"run_name={run_name!r} is blank; give a name, or None for a generated one")
    unsafe = control_characters(run_name) + bidi_controls(run_name)
    if unsafe:
        raise ValueError(
            f"run_name={run_name!r} holds the control character(s) {unsafe!r}, which would steer a terminal or show "
            "file names reordered; remove them"
        )
    return run_name


def _check_microbatch_size(size: int | None) -> int | None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"device_train_microbatch_size={size!r}: use a positive integer, or None for whole batches")
    return size


def _len_or_none(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _on_device(metrics: dict[str, Metric], device: torch.device) -> dict[str, Metric]:
    return {name: metric.to(device) for name, metric in metrics.items()}


def _reset(metrics: Iterable[Metric]) -> None:
    for metric in metrics:
        metric.reset()


def _computed(prefix: str, metrics: dict[str, Metric]) -> dict[str, float]:
    return {prefix + name: float(metric.compute()) for name, metric in metrics.items() if metric.update_called}


def _detached(outputs: Any) -> Any:
    return outputs.detach() if isinstance(outputs, torch.Tensor) else outputs


def _refuse_optimizers_that_need_a_closure(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """The loop calls ``optimizer.step()`` once per batch, without a closure; an optimizer whose ``step`` requires
    one (``torch.optim.LBFGS`` re-evaluates the loss many times per step) would fail at the first batch."""
    for optimizer in optimizers:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:
            raise ValueError(
                f"{type(optimizer).__name__} needs a closure that re-evaluates the loss at every step, and the "
                "Trainer steps once per batch without one; use an optimizer whose step() works alone (such as AdamW)"
            )
