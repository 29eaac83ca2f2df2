#!/usr/bin/env python3
"""Kill a training run with SIGKILL at random moments, resume it each time, and check what is on disk.

    python tools/kill_runs.py --out DIR --kills 50 -- -c configs/demo_tokenmix.yaml --data-dir DATA ...

Runs `train.py ARGS` once uninterrupted (DIR/straight), then again in DIR/killed: started, killed after a random
delay (counted from the moment the run writes its log, i.e. once start-up is over), relaunched with
`--resume latest` (its newest loadable checkpoint, or a fresh start when it has none), and so on until it finishes; then again from scratch until
`--kills` kills are spent. After every kill it loads each `*.pth.tar` a reader would pick up with a plain
`torch.load` and checks that no best epoch was lost (`model_best` is at least as good as every checkpoint on
disk). Each finished killed run is compared with the uninterrupted one (weights bit for bit, files, best
epoch). Prints the counts; exit code 1 when any check failed. A manual robustness check, not part of `make test`.
"""
import argparse
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True, help='folder for the two runs')
    parser.add_argument('--kills', type=int, default=50, help='number of kills (default: 50)')
    parser.add_argument('--min-delay', type=float, default=0.0, help='shortest time from start-up to a kill, s')
    parser.add_argument('--max-delay', type=float, default=15.0, help='longest time from start-up to a kill, s')
    parser.add_argument('--seed', type=int, default=0, help='seed of the kill delays')
    parser.add_argument('train_args', nargs=argparse.REMAINDER, help='-- then the arguments of train.py')
    args = parser.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != '--']
    return args


def wait_for_start(proc: subprocess.Popen, log: str) -> None:
    """Return once `log` has grown since the process was started, or the process has ended."""
    size = os.path.getsize(log) if os.path.exists(log) else 0
    while proc.poll() is None and (os.path.getsize(log) if os.path.exists(log) else 0) <= size:
        time.sleep(0.05)


def checkpoints_on_disk(folder: str) -> Dict[str, dict]:
    """Every file a reader globs, loaded with a plain torch.load (an unreadable one raises)."""
    return {os.path.basename(p): torch.load(p) for p in sorted(glob.glob(os.path.join(folder, '*.pth.tar')))}


def check_folder(folder: str, higher_is_better: bool) -> List[str]:
    """What is wrong on disk after a kill: unloadable files, or a model_best worse than a kept checkpoint."""
    try:
        files = checkpoints_on_disk(folder)
    except Exception as e:  # any failure of torch.load is what this tool looks for
        return [f'unloadable checkpoint: {e}']
    metrics = [c['metric'] for c in files.values() if c.get('metric') is not None]
    best = files.get('model_best.pth.tar', {}).get('metric')
    if metrics and (best is None or (max(metrics) > best if higher_is_better else min(metrics) < best)):
        return [f'best lost: model_best {best}, checkpoints {metrics}']
    return []


def compare(straight: str, run: str) -> List[str]:
    """How the finished killed run differs from the uninterrupted one (weights, files, best epoch)."""
    a, b = checkpoints_on_disk(straight), checkpoints_on_disk(run)
    problems = [f'{name} differs' for name in a['last.pth.tar']['state_dict']
                if not torch.equal(a['last.pth.tar']['state_dict'][name], b['last.pth.tar']['state_dict'][name])]
    if sorted(os.listdir(run)) != sorted(os.listdir(straight)):
        problems.append(f'other files: {sorted(os.listdir(run))} vs {sorted(os.listdir(straight))}')
    best = [(c['model_best.pth.tar']['epoch'], c['model_best.pth.tar']['metric']) for c in (a, b)]
    if best[0] != best[1]:
        problems.append(f'model_best (epoch, metric) {best[1]}, uninterrupted {best[0]}')
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    env = dict(os.environ, PYTHONPATH=ROOT)
    train = [sys.executable, os.path.join(ROOT, 'train.py'), *args.train_args, '--output', args.out]
    start = time.time()
    subprocess.run(train + ['--experiment', 'straight'], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    straight_seconds = time.time() - start
    run = os.path.join(args.out, 'killed')
    last = os.path.join(run, 'last.pth.tar')
    rng = random.Random(args.seed)
    higher_is_better = '--eval-metric' not in args.train_args or 'loss' not in args.train_args
    kills = in_save = before_first = rounds = 0
    problems: List[str] = []
    start = time.time()
    while kills < args.kills:  # a round: one killed run, resumed after each kill until it finishes
        rounds += 1
        shutil.rmtree(run, ignore_errors=True)
        while True:
            proc = subprocess.Popen(train + ['--experiment', 'killed', '--resume', 'latest'], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if kills < args.kills:
                wait_for_start(proc, os.path.join(run, 'log.txt'))
                try:
                    proc.wait(timeout=rng.uniform(args.min_delay, args.max_delay))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
            code = proc.wait()
            if code == 0:
                break
            if code != -signal.SIGKILL:
                problems.append(f'round {rounds}: train.py exited with {code}')
                break
            temps = glob.glob(os.path.join(run, '.*.tmp'))
            in_save += bool(temps)
            before_first += not os.path.exists(last)
            problems += [f'kill {kills}: {p}' for p in check_folder(run, higher_is_better)]
            print(f'kill {kills}: last epoch {torch.load(last)["epoch"] if os.path.exists(last) else None}'
                  f'{", inside a save" if temps else ""}', flush=True)
        if code == 0:
            problems += [f'round {rounds}: {p}' for p in compare(os.path.join(args.out, 'straight'), run)]
    print(f'uninterrupted run: {straight_seconds:.0f} s; {rounds} killed runs: {kills} kills ({in_save} inside a '
          f'save, {before_first} before the first checkpoint), {time.time() - start:.0f} s in all; each finished '
          f'killed run compared with the uninterrupted one (weights bit for bit, files, best epoch)')
    print('problems: ' + ('; '.join(problems) if problems else 'none'))
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
