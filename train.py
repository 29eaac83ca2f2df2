#!/usr/bin/env python3
"""TokenMix training with timm: `python train.py --data-dir DIR --model NAME --tokenmix --cutmix 1 ...`.

Flags follow timm's train.py (a DeiT recipe written with timm flags runs unchanged) plus TokenMix and teacher
flags; `-c FILE.yaml` gives defaults. Multi-process: `./distributed_train.sh NUM_PROC [args]` (torchrun).
This file only orchestrates; the pieces live in the `tokenmix_train` package, one concern per module.
"""
import logging
import os
import sys
from datetime import datetime
from typing import Optional, Sequence

import torch
from timm.data import resolve_data_config
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, get_outdir, random_seed

from tokenmix_train.args import parse_train_args, resolve_lr
from tokenmix_train.checkpoint import AtomicCheckpointSaver, continue_history, restore_rng_state, resume
from tokenmix_train.data import build_dataset, build_train_loader, num_dataset_classes
from tokenmix_train.distributed import init_device, is_primary, sync_batchnorm, wrap_ddp
from tokenmix_train.engine import NonFiniteLossError, Training, fit
from tokenmix_train.errors import ConfigError, run_cli
from tokenmix_train.evaluate import build_eval_loader
from tokenmix_train.flag_rules import output_problem
from tokenmix_train.logger import RunLogger, add_log_file, import_wandb, setup_logging, start_wandb
from tokenmix_train.mixing import build_criterion, build_mixer, build_teacher_from_args, mixer_generator
from tokenmix_train.model import build_student, check_input_size, patch_size_of
from tokenmix_train.precision import setup_precision
from tokenmix_train.teacher_maps import wrap_train_dataset

_logger = logging.getLogger('train')


def resolve_num_classes(args, train_dataset) -> int:
    """--num-classes, or the train split's class count; a dataset with more classes than asked is an error."""
    found = num_dataset_classes(train_dataset)
    if args.num_classes is None:
        if found is None:
            raise ConfigError('--num-classes is required for this dataset (it does not list its classes)')
        return found
    if found is not None and found > args.num_classes:
        raise ConfigError(f'--num-classes {args.num_classes} is less than the {found} classes of the train split')
    return args.num_classes


def resumes_in_place(args) -> bool:
    """A resumed run without --output/--experiment keeps writing into the folder of its checkpoint."""
    return bool(args.resume) and not args.experiment and not args.output


def output_base(args) -> str:
    """The folder the run folder goes in (the checkpoint's own folder when the run resumes in place)."""
    if resumes_in_place(args):
        return os.path.dirname(os.path.abspath(args.resume))
    return args.output or './output/train'


def output_folder(args, input_size: int) -> str:
    """timm's layout: --output/--experiment, a timestamped name by default; a resumed run keeps its folder."""
    if resumes_in_place(args):
        return output_base(args)
    name = args.experiment or '-'.join(
        [datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(input_size)])
    return get_outdir(output_base(args), name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, args_text, notes = parse_train_args(argv)
    problem = output_problem(output_base(args))
    if problem:
        raise ConfigError(problem)
    if args.log_wandb:
        import_wandb()
    device = init_device(args)
    primary = is_primary(args)
    setup_logging(primary)
    for level, note in notes:
        getattr(_logger, level)(note)
    random_seed(args.seed, args.rank)

    train_dataset = build_dataset(args, args.train_split, '--train-split', is_training=True)
    eval_dataset = build_dataset(args, args.val_split, '--val-split', is_training=False,
                                 class_to_idx=getattr(getattr(train_dataset, 'reader', None), 'class_to_idx', None))
    if len(train_dataset) < args.batch_size * args.world_size:
        raise ConfigError(f'the train split has {len(train_dataset)} images, fewer than one batch '
                          f'(-b {args.batch_size} x {args.world_size} processes)')
    num_classes = resolve_num_classes(args, train_dataset)

    model = build_student(args, num_classes)
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    token_size = args.tokenmix_patch_size or patch_size_of(model) or 16
    for size in [data_config['input_size']] + [(size, size) for size in args.train_img_sizes or ()]:
        check_input_size(model, size, token_size if args.tokenmix else None)
    teacher = build_teacher_from_args(args, num_classes, data_config['mean'], data_config['std'], device)
    train_dataset = wrap_train_dataset(args, train_dataset, data_config['input_size'], token_size)

    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else None
    model.to(device=device, dtype=model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        model = sync_batchnorm(model)
        args.dist_bn = ''  # as timm: synchronised statistics need no reduction
    train_loader = build_train_loader(train_dataset, args, data_config, device)
    average_batch = getattr(train_loader.batch_sampler, 'average_batch_size', None) \
        if args.train_img_sizes is not None else None
    lr = resolve_lr(args, args.world_size, average_batch)
    try:
        optimizer = create_optimizer_v2(model, **{**optimizer_kwargs(cfg=args), 'lr': lr, **args.opt_kwargs})
    except TypeError as e:
        raise ConfigError(f'--opt {args.opt} / --opt-kwargs: {e}') from None
    model, optimizer, amp_dtype, loss_scaler = setup_precision(args, model, optimizer, device)
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

    resumed = dict(start_epoch=0, rng_state=None, saver_state=None)
    if args.resume:
        resumed = resume(args.resume, model, optimizer=None if args.no_resume_opt else optimizer,
                         scheduler=scheduler, loss_scaler=loss_scaler, model_ema=model_ema,
                         rank=args.rank, world_size=args.world_size, workers=args.workers)
    start_epoch = args.start_epoch if args.start_epoch is not None else resumed['start_epoch']
    if scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            scheduler.step(start_epoch)

    saver, run_logger, output_dir, log_file = None, RunLogger(None), None, None
    if primary:  # every check has passed: only now is anything written
        output_dir = output_folder(args, data_config['input_size'][-1])
        log_file = add_log_file(output_dir)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            f.write(args_text)
        wandb_run = start_wandb(args, output_dir, os.path.basename(output_dir)) if args.log_wandb else None
        run_logger = RunLogger(output_dir, data_config['mean'], data_config['std'], wandb_run, args.save_images)
        saver = AtomicCheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=model_ema,
                                      amp_scaler=loss_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir,
                                      decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist)
        if args.resume:
            continue_history(saver, args.resume, resumed['saver_state'])
        _logger.info(f'output folder {output_dir}; {num_classes} classes, {len(train_dataset)} train / '
                     f'{len(eval_dataset)} val images, lr {lr:.3g}, epochs {start_epoch}..{num_epochs - 1}')

    if args.distributed:
        model = wrap_ddp(model, device, broadcast_buffers=not args.no_ddp_bb)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    if resumed['rng_state'] is not None:
        restore_rng_state(resumed['rng_state'], generator)
    elif start_epoch > 0:  # no saved streams for this world size: fresh ones, apart from epoch 0's
        random_seed(args.seed + start_epoch, args.rank)
        generator.set_state(mixer_generator(args.seed + start_epoch, args.rank).get_state())

    run = Training(model=model, optimizer=optimizer, criterion=build_criterion(args).to(device), device=device,
                   scheduler=scheduler, mixer=mixer, model_ema=model_ema, loss_scaler=loss_scaler,
                   amp_dtype=amp_dtype, grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad,
                   clip_mode=args.clip_mode, channels_last=args.channels_last, log_interval=args.log_interval,
                   mixup_off_epoch=args.mixup_off_epoch, distributed=args.distributed,
                   world_size=args.world_size, dist_bn=args.dist_bn, mix_generator=generator, logger=run_logger,
                   val_interval=args.val_interval, recovery_interval=args.recovery_interval, recovery_saver=saver,
                   ema_eval=not args.model_ema_force_cpu, synchronize_step=args.synchronize_step,
                   batch_loss_scale=args.variable_batch_loss_scale,
                   batch_size_reference=average_batch, model_dtype=model_dtype)

    def report_skipped(epoch: int) -> None:
        skipped = getattr(train_dataset, 'num_skipped', 0) + getattr(eval_dataset, 'num_skipped', 0)
        if skipped:
            _logger.warning(f'epoch {epoch}: {skipped} unreadable images skipped so far (this process)')

    try:
        best = fit(run, train_loader, eval_loader, saver, start_epoch=start_epoch, num_epochs=num_epochs,
                   eval_metric=args.eval_metric, on_epoch_end=report_skipped)
        if best is not None and best[0] is not None:
            _logger.info(f'*** best {args.eval_metric}: {best[0]:.2f} (epoch {best[1]})')
    except NonFiniteLossError as e:
        last = os.path.join(output_dir, 'last.pth.tar') if output_dir else None
        kept = f'; last good checkpoint kept: {last}' if last and os.path.exists(last) else '; no checkpoint saved'
        _logger.error(f'{e}{kept}')
        return 1
    finally:
        run_logger.close()
        if log_file is not None:
            logging.root.removeHandler(log_file)
            log_file.close()
    return 0


def run_main(argv: Optional[Sequence[str]] = None) -> int:
    """main() with bad input reported as one line and exit code 2."""
    return run_cli(main, 'train.py', argv)


if __name__ == '__main__':
    sys.exit(run_main())
