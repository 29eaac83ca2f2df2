"""The training loop: one epoch of mixed, optionally accumulated and scaled updates, and the epoch loop.

Everything a step needs travels in one `Training` object, so the functions take a handful of arguments.
The loss is checked for non-finite values without a host sync per step: the first bad step is recorded on
the device and checked (across ranks) at each log interval and at the end of the epoch; the run then stops
with `NonFiniteLossError` naming the step, before anything is saved, so the last good checkpoint is kept. After
each evaluation a non-finite eval loss or weight (model or EMA) stops the run the same way, so a diverged model
never becomes `last` or `model_best`.
"""
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
from timm.utils import dispatch_clip_grad, distribute_bn, unwrap_model

from .checkpoint import AtomicCheckpointSaver, gather_rng_states
from .data import set_loader_epoch
from .distributed import process_group_active
from .evaluate import evaluate
from .logger import RunLogger, StepMeter
from .preemption import Preempted, StopSignals
from .sampling import start_epoch_at

__all__ = ['Training', 'NonFiniteLossError', 'save_position', 'train_one_epoch', 'fit']

_logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss, the eval loss or the weights became NaN or infinite; the message names epoch and culprit."""


@dataclass
class Training:
    """The objects and settings of a run (`model` is DDP-wrapped when distributed; the teacher is in `mixer`)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Callable
    device: torch.device
    scheduler: Any = None
    mixer: Any = None
    model_ema: Any = None
    loss_scaler: Any = None
    amp_dtype: Optional[torch.dtype] = None
    grad_accum_steps: int = 1
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'
    channels_last: bool = False
    log_interval: int = 50
    mixup_off_epoch: int = 0
    distributed: bool = False
    world_size: int = 1
    dist_bn: str = 'reduce'
    mix_generator: Optional[torch.Generator] = None
    logger: RunLogger = field(default_factory=lambda: RunLogger(None))
    val_interval: int = 1  # evaluate and checkpoint every N epochs (and after the last)
    recovery_interval: int = 0  # write a recovery checkpoint (the run's position) every N updates (0: never) ...
    recovery_saver: Optional[AtomicCheckpointSaver] = None  # ... with this saver (primary rank only)
    stop: Optional[StopSignals] = None  # the stop signals, asked at every step boundary
    ema_eval: bool = True  # evaluate the EMA (off for timm's --model-ema-force-cpu)
    synchronize_step: bool = False
    batch_loss_scale: str = 'none'  # timm's --variable-batch-loss-scale: 'none', 'linear' or 'sqrt'
    batch_size_reference: Optional[float] = None  # the policy-average batch of scheduled resolution training
    model_dtype: Optional[torch.dtype] = None  # timm's --model-dtype: the student's weights and inputs

    def model_input(self, images: torch.Tensor, targets: Any = None) -> torch.Tensor:
        """The images as the student takes them (mixing and the teacher work in float32 before this)."""
        return images if self.model_dtype is None else images.to(self.model_dtype)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def _all_reduce(values: torch.Tensor, op=None) -> torch.Tensor:
    if process_group_active():
        dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values


def _check_finite(first_bad: torch.Tensor, epoch: int, num_batches: int) -> None:
    """Stop every rank together when any rank saw a non-finite loss (a collective call)."""
    bad = _all_reduce(first_bad.clone(), dist.ReduceOp.MIN if dist.is_available() else None).item()
    if math.isfinite(bad):
        raise NonFiniteLossError(
            f'non-finite training loss at epoch {epoch}, step {int(bad)} (batch {int(bad) + 1} of {num_batches}); '
            f'try a lower --lr, --clip-grad or --amp-dtype bfloat16')


def _check_diverged(run: Training, epoch: int, eval_loss: float) -> None:
    """Stop before saving when the eval loss or any weight is not finite (every rank sees the same values)."""
    found = [] if math.isfinite(eval_loss) else [f'eval loss {eval_loss}']
    for label, module in (('weights', run.model), ('EMA weights', run.model_ema)):
        if module is None:
            continue
        tensors = [(n, t) for n, t in unwrap_model(module).state_dict().items() if t.is_floating_point()]
        bad = [n for n, t in tensors if not bool(torch.isfinite(t).all())]
        if bad:
            found.append(f"{label} ({len(bad)} of {len(tensors)} tensors, first '{bad[0]}')")
    if found:
        raise NonFiniteLossError(f'the run diverged at epoch {epoch}: non-finite {" and ".join(found)}; nothing of '
                                 f'this epoch is saved; try a lower --lr, --clip-grad or --amp-dtype bfloat16')


def _backward(run: Training, loss: torch.Tensor, need_update: bool) -> None:
    params = unwrap_model(run.model).parameters
    if run.loss_scaler is not None:
        run.loss_scaler(loss, run.optimizer, clip_grad=run.clip_grad, clip_mode=run.clip_mode,
                        parameters=params(), need_update=need_update)
        return
    loss.backward()
    if need_update:
        if run.clip_grad is not None:
            dispatch_clip_grad(params(), run.clip_grad, mode=run.clip_mode)
        run.optimizer.step()


def _loss_scale(run: Training, batch_size: int) -> float:
    """timm's --variable-batch-loss-scale: the gradient of a batch weighed by its size against the average."""
    if run.batch_loss_scale == 'none' or not run.batch_size_reference:
        return 1.0
    ratio = batch_size / run.batch_size_reference
    return math.sqrt(ratio) if run.batch_loss_scale == 'sqrt' else ratio


def save_position(run: Training, epoch: int, batches: int, totals: torch.Tensor) -> Optional[str]:
    """Write the run's position after `batches` batches of `epoch` (a collective call): the weights, optimiser,
    EMA, scheduler and scaler as an epoch checkpoint holds them, every rank's RNG states and epoch totals, and
    where the epoch stands. Returns the file (primary rank; None elsewhere) once it is complete on disk."""
    rng_states = gather_rng_states(run.mix_generator, totals=totals.tolist())
    path = None
    if run.recovery_saver is not None:
        extra = dict(rng_states=rng_states, position=dict(epoch=epoch, batch=batches))
        if run.scheduler is not None:
            extra['scheduler'] = run.scheduler.state_dict()
        path = run.recovery_saver.save_position(epoch, batches, extra)
    if process_group_active():
        dist.barrier()  # no rank leaves before the file exists
    return path


def _stop_if_asked(run: Training, epoch: int, batches: int, totals: torch.Tensor,
                   check_finite: Callable[[], None] = lambda: None) -> None:
    """At a step boundary: when any rank got a stop signal, save the position and raise `Preempted`
    (`check_finite` first: a non-finite loss is never saved; it syncs, so only once a stop is agreed)."""
    if run.stop is None or not run.stop.requested():
        return
    check_finite()
    path = save_position(run, epoch, batches, totals)
    raise Preempted(f'stopped by {run.stop.name} at epoch {epoch} after batch {batches}' +
                    (f"; position saved in '{path}'" if path else ''))


def train_one_epoch(run: Training, epoch: int, loader, start: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """Train one epoch; returns the loss averaged over all ranks' images and the global images/s.

    `start` (a resume within the epoch) holds the batches already done (`batch`) and this rank's running
    `totals` (loss x images, images); those batches are not read again.
    """
    model, device, accum = run.model, run.device, run.grad_accum_steps
    first_batch = start['batch'] if start else 0
    model.train()
    if run.mixer is not None and run.mixup_off_epoch and epoch >= run.mixup_off_epoch:
        run.mixer.mixup_enabled = False
    start_epoch_at(loader, epoch, first_batch)
    num_batches = first_batch + len(loader)
    meter = StepMeter(loader, f'train epoch {epoch}', run.log_interval, world_size=run.world_size,
                      steps_before=epoch * ((num_batches + accum - 1) // accum), batches_per_step=accum,
                      first_batch=first_batch, on_log=lambda step, values: run.logger.scalars(step, values, 'train'))
    totals = torch.tensor(start['totals'] if start else [0.0, 0.0], dtype=torch.float64, device=device)
    window = torch.zeros(2, dtype=torch.float64, device=device)  # loss * images, images since the last log line
    first_bad = torch.full((), math.inf, device=device)
    run.optimizer.zero_grad(set_to_none=True)
    _stop_if_asked(run, epoch, first_batch, totals)
    for idx, (images, targets) in enumerate(meter, first_batch):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        last = idx == num_batches - 1
        need_update = last or (idx + 1) % accum == 0
        if run.mixer is not None:
            images, targets = run.mixer(images, targets)
        run.logger.train_batch(epoch, idx, images, getattr(run.mixer, 'last_mask', None), log_step=meter.due,
                               last_step=last)
        if run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        no_sync = run.distributed and not need_update and hasattr(model, 'no_sync')
        with model.no_sync() if no_sync else nullcontext():
            with run.autocast():
                loss = run.criterion(model(run.model_input(images)), targets)
            _backward(run, loss * (_loss_scale(run, images.shape[0]) / accum), need_update)
        step_loss = loss.detach().float()
        first_bad = torch.where(torch.isfinite(step_loss) | torch.isfinite(first_bad), first_bad,
                                torch.tensor(float(idx), device=device))
        batch = torch.stack([step_loss.double() * images.shape[0],
                             torch.tensor(images.shape[0], dtype=torch.float64, device=device)])
        totals += batch
        window += batch
        if not need_update:
            continue
        _after_update(run, meter, first_bad, window, epoch, num_batches)
        if run.recovery_interval and (idx // accum + 1) % run.recovery_interval == 0:
            _check_finite(first_bad, epoch, num_batches)
            save_position(run, epoch, idx + 1, totals)
        _stop_if_asked(run, epoch, idx + 1, totals, lambda: _check_finite(first_bad, epoch, num_batches))
    loss_sum, count = _all_reduce(totals).tolist()
    return dict(loss=loss_sum / max(count, 1.0), img_per_sec=count / max(meter.elapsed, 1e-9))


def _after_update(run: Training, meter: StepMeter, first_bad: torch.Tensor, window: torch.Tensor, epoch: int,
                  num_batches: int) -> None:
    """After an optimiser step: EMA and schedule steps, and at log steps the finite check and the loss line."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.synchronize_step and run.device.type == 'cuda':
        torch.cuda.synchronize()
    if run.model_ema is not None:
        run.model_ema.update(unwrap_model(run.model), step=meter.step)
    if run.scheduler is not None:
        run.scheduler.step_update(num_updates=meter.step)
    if meter.due:
        _check_finite(first_bad, epoch, num_batches)
        loss_sum, count = _all_reduce(window.clone()).tolist()
        meter.update(loss=loss_sum / count, lr=run.optimizer.param_groups[0]['lr'])
        window.zero_()


def _evaluate_epoch(run: Training, eval_loader, epoch: int) -> Dict[str, float]:
    """The epoch's eval metrics: the model's, or with an evaluated EMA the EMA's beside the model's `raw_*`.

    Stops the run (`NonFiniteLossError`) when the eval loss or a weight is not finite.
    """
    metrics = evaluate(unwrap_model(run.model), eval_loader, run.device, amp_dtype=run.amp_dtype,
                       input_transform=run.model_input)
    _logger.info(f'eval epoch {epoch}: top-1 {metrics["top1"]:.2f} top-5 {metrics["top5"]:.2f} '
                 f'loss {metrics["loss"]:.4f} ({metrics["count"]} images)')
    eval_metrics = {k: metrics[k] for k in ('top1', 'top5', 'loss')}
    if run.model_ema is not None and run.ema_eval:
        if run.distributed and run.dist_bn:
            distribute_bn(run.model_ema, run.world_size, reduce=run.dist_bn == 'reduce')
        ema = evaluate(unwrap_model(run.model_ema), eval_loader, run.device, amp_dtype=run.amp_dtype,
                       input_transform=run.model_input)
        _logger.info(f'eval epoch {epoch} (EMA): top-1 {ema["top1"]:.2f} top-5 {ema["top5"]:.2f} '
                     f'loss {ema["loss"]:.4f}')
        eval_metrics = dict({k: ema[k] for k in eval_metrics}, **{f'raw_{k}': v for k, v in eval_metrics.items()})
    _check_diverged(run, epoch, metrics['loss'])
    return eval_metrics


def fit(run: Training, train_loader, eval_loader, saver: Optional[AtomicCheckpointSaver], *, start_epoch: int,
        num_epochs: int, eval_metric: str = 'top1', start: Optional[Dict[str, Any]] = None,
        on_epoch_end: Optional[Callable[[int], None]] = None) -> Optional[tuple]:
    """The epoch loop: train, evaluate (model and EMA), step the schedule, checkpoint, write the summary row.

    As in timm, with an evaluated EMA its metrics are the `eval_*` ones that rank checkpoints (the raw model's
    are kept as `eval_raw_*`), and epochs off --val-interval (but the last) skip evaluation and checkpoints.
    `saver` is None on non-primary ranks (they still take part in every collective). `start` continues
    `start_epoch` within (`train_one_epoch`). Once an epoch is saved, the position files before it are removed.
    Returns timm's (best_metric, best_epoch) on the primary rank.
    """
    best = None
    for epoch in range(start_epoch, num_epochs):
        set_loader_epoch(train_loader, epoch)
        train_metrics = train_one_epoch(run, epoch, train_loader, start if epoch == start_epoch else None)
        if run.distributed and run.dist_bn:  # one model on every rank before each rank evaluates its shard
            distribute_bn(run.model, run.world_size, reduce=run.dist_bn == 'reduce')
        eval_metrics = None
        if (epoch + 1) % run.val_interval == 0 or epoch + 1 == num_epochs:
            eval_metrics = _evaluate_epoch(run, eval_loader, epoch)
        else:
            _logger.info(f'epoch {epoch}: no evaluation or checkpoint (--val-interval {run.val_interval})')
        lr = run.optimizer.param_groups[0]['lr']
        if run.scheduler is not None:
            run.scheduler.step(epoch + 1, None if eval_metrics is None else eval_metrics[eval_metric])
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if eval_metrics is None:
            continue
        rng_states = gather_rng_states(run.mix_generator)  # collective: every rank's streams go in the file
        if saver is not None:
            extra = dict(rng_states=rng_states)
            if run.scheduler is not None:
                extra['scheduler'] = run.scheduler.state_dict()
            best = saver.save(epoch, eval_metrics[eval_metric], extra)
            saver.drop_positions()
        run.logger.epoch_summary(epoch, train_metrics, eval_metrics, lr)
    return best
