"""--initial-checkpoint in a real train.py run: the student starts from the file's weights, not its own init."""
import pytest
import timm
import torch

from tests.train_spies import is_vit, spy_forwards


@pytest.mark.slow  # a whole run or model: out of make test-fast
def test_initial_checkpoint_gives_the_starting_weights(train_script, train_argv, tmp_path):
    torch.manual_seed(123)  # another init than the run's (--seed 0)
    weights = timm.create_model('tokenmix_vit_tiny_p8_64', img_size=32, num_classes=10, embed_dim=32, depth=1,
                                num_heads=2).state_dict()
    path = tmp_path / 'initial.pth.tar'
    torch.save({'state_dict': weights, 'epoch': 7}, path)
    with spy_forwards(is_vit) as student:
        assert train_script.run_main(train_argv('--initial-checkpoint', str(path), '--epochs', '1')) == 0
    assert student.first_state.keys() == weights.keys() and not student.changed(weights)
    saved = torch.load(tmp_path / 'out' / 'run' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert saved['epoch'] == 0 and student.changed(saved['state_dict'])  # a fresh run from there, which trained
