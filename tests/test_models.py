import pytest
import torch

from alldetect.cli import main
from alldetect.errors import UserError
from alldetect.models import REPORT_ARCHS, count_parameters, create_model
from alldetect.models.proposed import feature_side


def test_proposed_matches_the_report_at_300():
    model = create_model("proposed", input_size=300)
    assert count_parameters(model) == (64_061_370, 5_568)  # Keras: 64,066,938 in all
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13 and [c.out_channels for c in convs][-1] == 512
    assert model.classifier[1].in_features == 12_800  # 5 x 5 x 512


def test_proposed_ceil_pooling_and_other_sizes():
    assert feature_side(300) == 5 and feature_side(64) == 1 and feature_side(100) == 2
    model = create_model("proposed", input_size=100)
    assert model.classifier[1].in_features == 512 * 2 * 2
    assert model(torch.zeros(1, 3, 100, 100)).shape == (1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*REPORT_ARCHS, "efficientnet_b0"])
def test_every_architecture_trains_a_step(name):
    size = 80 if name in ("inception_v3", "alexnet") else 64
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, dropout=0.2, input_size=size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 1])
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (2, 2)
    loss = torch.nn.functional.cross_entropy(out, y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    opt.step()


def test_unknown_architecture_suggests_names():
    with pytest.raises(UserError, match=r"unknown architecture 'resnet5O'.*Did you mean: .*resnet50") as e:
        create_model("resnet5O")
    names = str(e.value).split("Did you mean: ")[1].rstrip("?").split(", ")
    assert len(names) == len(set(names))  # resnet50 is both a report architecture and a timm name: once


def test_input_too_small():
    with pytest.raises(UserError, match="too small for inception_v3"):
        create_model("inception_v3", input_size=64)


@pytest.mark.parametrize("name", ["resnet50", "alexnet"])
def test_pretrained_offline_gives_clear_error(name, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"pretrained=false.*pretrained_path="):
        create_model(name, pretrained=True)


def test_pretrained_path_loads_local_weights(tmp_path):
    torch.manual_seed(1)
    donor = create_model("resnet18", num_classes=1000)
    torch.save(donor.state_dict(), tmp_path / "w.pth")
    model = create_model("resnet18", pretrained_path=str(tmp_path / "w.pth"))
    assert torch.equal(model.conv1.weight, donor.conv1.weight)
    assert model.fc.out_features == 2


def test_models_command(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "64061370" in out and "inception_v3" in out and "299" in out


def test_subtract_mean_makes_the_network_blind_to_a_colour_cast():
    """Pan et al.'s per-image mean-colour subtraction: a constant added to a channel of the whole image (a stain or
    lamp difference) changes nothing the network sees; without it, it does."""
    x = torch.rand(2, 3, 40, 40)
    cast = x + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)
    for subtract, same in ((True, True), (False, False)):
        torch.manual_seed(0)
        model = create_model("resnet18", dropout=0.0, input_size=40, subtract_mean=subtract).eval()
        with torch.no_grad():
            assert torch.allclose(model(x), model(cast), atol=1e-5) is same
