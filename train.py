#!/usr/bin/env python3
"""TokenMix training with timm: `python train.py --data-dir DIR --model NAME --tokenmix --cutmix 1 ...`.

Flags follow timm's train.py (a DeiT recipe written with timm flags runs unchanged) plus TokenMix and teacher
flags; `-c FILE.yaml` gives defaults. Multi-process: `./distributed_train.sh NUM_PROC [args]` (torchrun).
This file only orchestrates; the pieces live in the `tokenmix_train` package, one concern per module.
"""
import argparse
import logging
import os
import sys
from datetime import datetime
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset
from timm.data import resolve_data_config
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, get_outdir, random_seed

from models import Teacher
from tokenmix_train.args import parse_train_args, resolve_lr
from tokenmix_train.checkpoint import (LATEST, AtomicCheckpointSaver, continue_history, latest_checkpoint,
                                      restore_rng_state, resume, run_checkpoints)
from tokenmix_train.data import build_dataset, build_train_loader, resolve_num_classes
from tokenmix_train.distributed import init_device, is_primary, run_cli, sync_batchnorm, wrap_ddp
from tokenmix_train.engine import NonFiniteLossError, Training, fit
from tokenmix_train.errors import ConfigError
from tokenmix_train.evaluate import build_eval_loader
from tokenmix_train.flag_rules import output_problem
from tokenmix_train.logger import RunLogger, add_log_file, import_wandb, setup_logging, start_wandb
from tokenmix_train.mixing import build_criterion, build_mixer, build_teacher_from_args, mixer_generator
from tokenmix_train.model import (build_student, check_input_size, compile_model, model_dtype_of, place_model,
                                  token_size_of)
from tokenmix_train.precision import setup_precision
from tokenmix_train.preemption import PREEMPTED_EXIT_CODE, Preempted, StopSignals, signal_numbers, stop_group
from tokenmix_train.run_folder import RunLock, check_free, replace_file, writing
from tokenmix_train.sampling import resumable_loader
from tokenmix_train.teacher_maps import wrap_train_dataset

_logger = logging.getLogger('train')


def resumes_in_place(args: argparse.Namespace) -> bool:
    """A run resumed from a file without --output/--experiment keeps writing into the folder of its checkpoint."""
    return bool(args.resume) and args.resume not in LATEST and not args.experiment and not args.output


def output_base(args: argparse.Namespace) -> str:
    """The folder the run folder goes in (the checkpoint's own folder when the run resumes in place)."""
    if resumes_in_place(args):
        return os.path.dirname(os.path.abspath(args.resume))
    return args.output or './output/train'


def output_folder(args: argparse.Namespace, input_size: int) -> str:
    """timm's layout: --output/--experiment, a timestamped name by default; a resumed run keeps its folder."""
    if resumes_in_place(args):
        return output_base(args)
    name = args.experiment or '-'.join(
        [datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(input_size)])
    with writing(os.path.join(output_base(args), name)):  # a full disk: one line, as for any file of the run
        return get_outdir(output_base(args), name)


def resume_source(args: argparse.Namespace) -> str:
    """The checkpoint the run resumes from ('' for none): --resume's file, or for `latest` the newest loadable one
    of the run folder --output/--experiment ('' when it holds none).

    A run folder held by a live run, or holding a run's checkpoints while --resume is not given (a relaunch would
    restart at epoch 0 over them), is a ConfigError; nothing is written before these checks.
    """
    folder = os.path.join(output_base(args), args.experiment) if args.experiment else None
    if folder and is_primary(args):  # the primary alone: the others could meet its own lock, taken meanwhile
        check_free(folder)
    if args.resume in LATEST:
        if folder is None:
            raise ConfigError(f'--resume {args.resume} needs --experiment: it continues the run folder '
                              f'--output/--experiment')
        latest = latest_checkpoint(folder)
        if latest is None:
            _logger.info(f"--resume {args.resume}: no checkpoint in '{folder}', starting afresh")
            return ''
        return latest[0]
    if not args.resume and folder and run_checkpoints(folder):
        raise ConfigError(f"--output/--experiment '{folder}' holds the checkpoints of a run: --resume latest "
                          f"continues it, another --experiment starts afresh")
    return args.resume


def build_datasets(args: argparse.Namespace) -> Tuple[Dataset, Dataset, int]:
    """The train and val splits (val labels use the train class index) and the class count."""
    train_dataset = build_dataset(args, args.train_split, '--train-split', is_training=True)
    eval_dataset = build_dataset(args, args.val_split, '--val-split', is_training=False,
                                 class_to_idx=getattr(getattr(train_dataset, 'reader', None), 'class_to_idx', None))
    if len(train_dataset) < args.batch_size * args.world_size:
        raise ConfigError(f'the train split has {len(train_dataset)} images, fewer than one batch '
                          f'(-b {args.batch_size} x {args.world_size} processes)')
    return train_dataset, eval_dataset, resolve_num_classes(args.num_classes, train_dataset, 'the train split')


def build_model_and_teacher(args: argparse.Namespace, num_classes: int,
                            device: torch.device) -> Tuple[torch.nn.Module, Dict[str, Any], int, Optional[Teacher]]:
    """The student on its device (input sizes checked), its data config and TokenMix token size, and the teacher."""
    model = build_student(args, num_classes)
    data_config = resolve_data_config(vars(args), model=model, verbose=is_primary(args))
    token_size = token_size_of(model, args.tokenmix_patch_size)
    for size in [data_config['input_size']] + [(size, size) for size in args.train_img_sizes or ()]:
        check_input_size(model, size, token_size if args.tokenmix else None)
    teacher = build_teacher_from_args(args, num_classes, data_config['mean'], data_config['std'], device)
    model = place_model(model, args, device)
    if args.distributed and args.sync_bn:
        model = sync_batchnorm(model)
        args.dist_bn = ''  # as timm: synchronised statistics need no reduction
    return model, data_config, token_size, teacher


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's optimiser of --opt at learning rate `lr`; settings it refuses (--opt-kwargs it does not take, SGD's
    Nesterov momentum at --momentum 0, ...) are a ConfigError naming the optimiser flags."""
    try:
        return create_optimizer_v2(model, **{**optimizer_kwargs(cfg=args), 'lr': lr, **args.opt_kwargs})
    except (TypeError, ValueError) as e:
        raise ConfigError(f'--opt {args.opt} (--momentum {args.momentum}, --weight-decay {args.weight_decay}, '
                          f'--opt-kwargs {args.opt_kwargs or "none"}): {e}') from None


def training_state(args: argparse.Namespace, resume_path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: Any, loss_scaler: Any, model_ema: Any, updates_per_epoch: int) -> Dict[str, Any]:
    """Where the run starts: dict(start_epoch, start, rng_state, saver_state) of `resume` (`resume_path` loaded
    into the run's objects; `start` the position within the start epoch) or of a fresh run, and `start_update`,
    the updates done before; --start-epoch wins (at the epoch's start), and the schedule is stepped to the start."""
    state = dict(start_epoch=0, start=None, rng_state=None, saver_state=None)
    if resume_path:
        state = resume(resume_path, model, optimizer=None if args.no_resume_opt else optimizer, scheduler=scheduler,
                       loss_scaler=loss_scaler, model_ema=model_ema, rank=args.rank, world_size=args.world_size)
    if args.start_epoch is not None:
        state.update(start_epoch=args.start_epoch, start=None)
    first_batch = state['start']['batch'] if state['start'] else 0
    state['start_update'] = state['start_epoch'] * updates_per_epoch + -(-first_batch // args.grad_accum_steps)
    if scheduler is not None and state['start_update'] > 0:  # each call leaves the other kind of schedule alone
        scheduler.step(state['start_epoch'])
        scheduler.step_update(state['start_update'])
    return state


def open_output(args: argparse.Namespace, args_text: str, data_config: Dict[str, Any], saved: Dict[str, Any],
                resume_path: str, state: Dict[str, Any]) -> Tuple[str, RunLock, logging.Handler, RunLogger,
                                                                  AtomicCheckpointSaver]:
    """The run folder, locked for this run, with its log file, args.yaml, run logger (TensorBoard, W&B) and
    checkpoint saver; what was logged for the epochs from the start epoch on is dropped (the run logs it again).

    `saved` are the objects each checkpoint holds (model, optimizer, model_ema, amp_scaler); `state` is
    `training_state`'s, whose saver_state (the history of `resume_path`) continues when the run writes into the
    same folder.
    """
    output_dir = output_folder(args, data_config['input_size'][-1])
    lock = RunLock(output_dir)
    # the saver first: it removes what an interrupted save left, so a full disk has room for what follows
    saver = AtomicCheckpointSaver(**saved, args=args, checkpoint_dir=output_dir, recovery_dir=output_dir,
                                  decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist)
    log_file = add_log_file(output_dir)
    replace_file(os.path.join(output_dir, 'args.yaml'), args_text.encode())
    wandb_run = start_wandb(args, output_dir, os.path.basename(output_dir)) if args.log_wandb else None
    run_logger = RunLogger(output_dir, data_config['mean'], data_config['std'], wandb_run, args.save_images)
    if resume_path:
        continue_history(saver, resume_path, state['saver_state'])
    run_logger.drop_rerun(state['start_epoch'], state['start_update'])
    return output_dir, lock, log_file, run_logger, saver


def restore_streams(args: argparse.Namespace, rng_state: Optional[Dict[str, Any]], generator: torch.Generator,
                    start_epoch: int) -> None:
    """The random streams of the resumed run, or fresh ones apart from epoch 0's when none were saved for this
    world size."""
    if rng_state is not None:
        restore_rng_state(rng_state, generator)
    elif start_epoch > 0:
        random_seed(args.seed + start_epoch, args.rank)
        generator.set_state(mixer_generator(args.seed + start_epoch, args.rank).get_state())


def report_skipped(datasets: Sequence[Dataset], epoch: int) -> None:
    """Warn when unreadable images were skipped (--skip-bad-images)."""
    skipped = sum(getattr(dataset, 'num_skipped', 0) for dataset in datasets)
    if skipped:
        _logger.warning(f'epoch {epoch}: {skipped} unreadable images skipped so far (this process)')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train --model; the exit code of `train_epochs`."""
    args, args_text, notes = parse_train_args(argv)
    problem = output_problem(output_base(args))
    if problem:
        raise ConfigError(problem)
    if args.log_wandb:
        import_wandb()
    device = init_device(args)
    setup_logging(is_primary(args))
    for level, note in notes:
        getattr(_logger, level)(note)
    resume_path = resume_source(args)
    random_seed(args.seed, args.rank)

    train_dataset, eval_dataset, num_classes = build_datasets(args)
    model, data_config, token_size, teacher = build_model_and_teacher(args, num_classes, device)
    train_dataset = wrap_train_dataset(args, train_dataset, data_config['input_size'], token_size)

    train_loader = resumable_loader(build_train_loader(train_dataset, args, data_config, device), args.seed,
                                    args.rank, signal_numbers(args.preempt_signal))
    average_batch = getattr(train_loader.batch_sampler, 'average_batch_size', None) \
        if args.train_img_sizes is not None else None
    lr = resolve_lr(args, args.world_size, average_batch)
    model, optimizer, amp_dtype, loss_scaler = setup_precision(args, model, build_optimizer(args, model, lr), device)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                           device='cpu' if args.model_ema_force_cpu else None) if args.model_ema else None
    eval_loader = build_eval_loader(eval_dataset, data_config, args.validation_batch_size or args.batch_size,
                                    args.workers, args.distributed, device=device,
                                    use_prefetcher=not args.no_prefetcher, pin_memory=args.pin_mem)
    updates_per_epoch = (len(train_loader) + args.grad_accum_steps - 1) // args.grad_accum_steps
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                updates_per_epoch=updates_per_epoch)
    generator = mixer_generator(args.seed, args.rank)
    mixer = build_mixer(args, num_classes, token_size, teacher, generator)

    state = training_state(args, resume_path, model, optimizer, scheduler, loss_scaler, model_ema, updates_per_epoch)
    start_epoch = state['start_epoch']

    saver, run_logger, output_dir, lock, log_file = None, RunLogger(None), None, None, None
    if is_primary(args):  # every check has passed: only now is anything written
        output_dir, lock, log_file, run_logger, saver = open_output(
            args, args_text, data_config, dict(model=model, optimizer=optimizer, model_ema=model_ema,
                                               amp_scaler=loss_scaler), resume_path, state)
        _logger.info(f'output folder {output_dir}; {num_classes} classes, {len(train_dataset)} train / '
                     f'{len(eval_dataset)} val images, lr {lr:.3g}, epochs {start_epoch}..{num_epochs - 1}')

    if args.distributed:
        model = wrap_ddp(model, device, broadcast_buffers=not args.no_ddp_bb)
    model = compile_model(model, args)
    restore_streams(args, state['rng_state'], generator, start_epoch)

    run = Training(model=model, optimizer=optimizer, criterion=build_criterion(args).to(device), device=device,
                   scheduler=scheduler, mixer=mixer, model_ema=model_ema, loss_scaler=loss_scaler,
                   amp_dtype=amp_dtype, grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad,
                   clip_mode=args.clip_mode, channels_last=args.channels_last, log_interval=args.log_interval,
                   mixup_off_epoch=args.mixup_off_epoch, distributed=args.distributed,
                   world_size=args.world_size, dist_bn=args.dist_bn, mix_generator=generator, logger=run_logger,
                   val_interval=args.val_interval, recovery_interval=args.recovery_interval, recovery_saver=saver,
                   ema_eval=not args.model_ema_force_cpu, synchronize_step=args.synchronize_step,
                   batch_loss_scale=args.variable_batch_loss_scale,
                   batch_size_reference=average_batch, model_dtype=model_dtype_of(args))
    try:
        return train_epochs(args, run, (train_loader, eval_loader), saver, state, num_epochs,
                            (train_dataset, eval_dataset), output_dir)
    finally:
        run_logger.close()
        if log_file is not None:
            logging.root.removeHandler(log_file)
            log_file.close()
        if lock is not None:
            lock.release()


def train_epochs(args: argparse.Namespace, run: Training, loaders: Tuple[Any, Any],
                 saver: Optional[AtomicCheckpointSaver], state: Dict[str, Any], num_epochs: int,
                 datasets: Tuple[Dataset, Dataset], output_dir: Optional[str]) -> int:
    """`fit` from the start `state`, with the stop signals caught; the exit code: 0 when the run ends, 1 when the
    loss or the weights stop being finite, `PREEMPTED_EXIT_CODE` when a signal stopped it after saving."""
    try:
        with StopSignals(signal_numbers(args.preempt_signal), stop_group()) as run.stop:
            best = fit(run, *loaders, saver, start_epoch=state['start_epoch'], start=state['start'],
                       num_epochs=num_epochs, eval_metric=args.eval_metric,
                       on_epoch_end=partial(report_skipped, datasets))
        if best is not None and best[0] is not None:
            _logger.info(f'*** best {args.eval_metric}: {best[0]:.2f} (epoch {best[1]})')
    except NonFiniteLossError as e:
        last = os.path.join(output_dir, 'last.pth.tar') if output_dir else None
        kept = f'; last good checkpoint kept: {last}' if last and os.path.exists(last) else '; no checkpoint saved'
        _logger.error(f'{e}{kept}')
        return 1
    except Preempted as e:
        _logger.warning(f'{e}; the same command with --resume latest continues from there '
                        f'(exit code {PREEMPTED_EXIT_CODE})')
        return PREEMPTED_EXIT_CODE
    return 0


def run_main(argv: Optional[Sequence[str]] = None) -> int:
    """main() with bad input reported as one line and exit code 2."""
    return run_cli(main, 'train.py', argv)


if __name__ == '__main__':
    sys.exit(run_main())
