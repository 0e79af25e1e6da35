import pytest
import torch

from cl_service.serve.states import pack_states, unpack_states


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_packed_states_round_trip_exactly_and_concatenate(dtype):
    a = torch.randn(1, 5, 8).to(dtype)
    b = torch.randn(2, 5, 8).to(dtype)  # a two-image request
    pa, pb = pack_states(a), pack_states(b)
    assert type(pa[0]).__module__ == "numpy" and pa[1] == str(dtype).removeprefix("torch.")
    out = unpack_states([pa, pb], "cpu")
    assert out.dtype == dtype and out.shape == (3, 5, 8)
    assert torch.equal(out, torch.cat([a, b]))


def test_missing_or_mixed_states():
    p = pack_states(torch.zeros(1, 2, 2))
    assert unpack_states([p, None], "cpu") is None and unpack_states([], "cpu") is None
    with pytest.raises(ValueError, match="mixed dtypes"):
        unpack_states([p, pack_states(torch.zeros(1, 2, 2, dtype=torch.bfloat16))], "cpu")
