import math

import torch

from fraudflow.models import Standardizer


def test_missing_values_are_left_out_of_the_moments_and_become_the_mean() -> None:
    nan = math.nan
    x = torch.tensor([[1.0, nan], [3.0, 4.0], [nan, 8.0], [5.0, nan]])
    fitted = Standardizer.fit(x)
    assert fitted.mean.tolist() == [3.0, 6.0]
    # Population std of the present values: (1, 3, 5) -> sqrt(8/3); (4, 8) -> 2.
    assert torch.allclose(fitted.std, torch.tensor([math.sqrt(8 / 3), 2.0]))
    z = fitted.transform(x)
    assert not z.isnan().any()
    assert z[2, 0] == 0.0 and z[0, 1] == 0.0  # missing -> the training mean
    assert torch.isclose(z[1, 1], torch.tensor(-1.0))
