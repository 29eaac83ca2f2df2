"""Mixed precision in a real train.py run on the CPU: bfloat16 autocast trains, checkpoints and resumes bit for bit."""
import pytest
import torch

from conftest import run_until_epoch
from tests.train_spies import spy_forwards

pytestmark = pytest.mark.slow  # bf16 runs (slow convolutions on the CPU) and a resume

BF16_AUTOCAST = ['--amp', '--amp-dtype', 'bfloat16', '--device', 'cpu', '--tokenmix', '--cutmix', '1.0',
                 '--model-ema', '--model-ema-decay', '0.9', '--epochs', '2']


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_bfloat16_autocast_trains_and_resumes_bit_for_bit(train_script, train_argv, tmp_path, monkeypatch):
    with spy_forwards(lambda m: isinstance(m, torch.nn.Linear)) as linears:
        assert train_script.run_main(train_argv(*BF16_AUTOCAST, experiment='straight')) == 0
    # autocast ran: every linear layer of the student computed in bfloat16, in training and in evaluation ...
    assert {(call.training, call.output.dtype) for call in linears.calls} == \
        {(True, torch.bfloat16), (False, torch.bfloat16)}
    straight = _load(tmp_path / 'out' / 'straight' / 'last.pth.tar')
    # ... on float32 weights (autocast, not --model-dtype), without a loss scaler (bfloat16 needs none)
    assert {t.dtype for t in straight['state_dict'].values()} == {torch.float32}
    assert 'amp_scaler' not in straight

    run_until_epoch(train_script, monkeypatch, train_argv(*BF16_AUTOCAST, experiment='stopped'), 1)
    stopped = tmp_path / 'out' / 'stopped' / 'last.pth.tar'
    assert _load(stopped)['epoch'] == 0
    assert train_script.run_main(train_argv(*BF16_AUTOCAST, '--resume', str(stopped), experiment='stopped')) == 0

    resumed = _load(stopped)
    assert resumed['epoch'] == straight['epoch'] == 1
    for key in ('state_dict', 'state_dict_ema'):
        assert resumed[key].keys() == straight[key].keys()
        for name, tensor in straight[key].items():
            assert torch.equal(resumed[key][name], tensor), f'{key}.{name} differs after resume'
