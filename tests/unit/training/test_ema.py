import pytest
import torch

from training.ema import WeightAverage


def test_average_tracks_a_running_mean_and_swaps_back():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    avg = WeightAverage(model, decay=0.5)
    start = model.weight.detach().clone()
    history = [start]
    expected = start.clone()
    for n in range(1, 30):
        with torch.no_grad():
            model.weight.add_(1.0)
        history.append(model.weight.detach().clone())
        avg.update()
        decay = min(0.5, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * model.weight.detach()
    live = model.weight.detach().clone()
    with avg.swapped_in():
        torch.testing.assert_close(model.weight, expected)
        assert not torch.equal(model.weight, live)  # the average lags the live weights
    torch.testing.assert_close(model.weight, live)  # restored after


def test_state_round_trip_and_shape_check():
    model = torch.nn.Linear(3, 2)
    avg = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.mul_(2)
    avg.update()
    other = WeightAverage(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(avg.state_dict())
    for a, b in zip(avg.shadow, other.shadow, strict=True):
        torch.testing.assert_close(a, b)
    assert other.updates == 1
    with pytest.raises(ValueError, match="does not match"):
        WeightAverage(torch.nn.Linear(4, 2), decay=0.9).load_state_dict(avg.state_dict())
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)
