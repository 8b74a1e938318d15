"""A pool's spec: GPU placement of a launched server, checked against its tensor
parallelism where the config is read."""

import pytest
from pydantic import ValidationError

from cord.common.pools import model_spec

VLLM = {"name": "m", "model": "/models/R1", "engine": "vllm"}


def test_gpus_follow_the_device_or_the_list():
    assert model_spec(**VLLM, device="cuda:1").visible_gpus == [1]
    assert model_spec(**VLLM, device="cuda").visible_gpus is None
    two = model_spec(**VLLM, device="cuda", tensor_parallel_size=2, gpus=[2, 3])
    assert two.visible_gpus == [2, 3] and two.parallel == 2
    sglang = model_spec(
        name="s", model="/m", engine="sglang", device="cuda", tp_size=2, gpus=[0, 1]
    )
    assert sglang.visible_gpus == [0, 1] and sglang.parallel == 2


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"device": "cuda", "tensor_parallel_size": 2, "gpus": [2]}, r"spans 2 GPU\(s\)"),
        ({"device": "cuda:1", "tensor_parallel_size": 2}, r"spans 2 GPU\(s\)"),
        ({"device": "cuda", "gpus": [1, 1], "tensor_parallel_size": 2}, "names a GPU twice"),
        ({"gpus": [0]}, "device is cpu"),
    ],
)
def test_a_placement_that_cannot_hold_the_server_is_refused(fields, problem):
    with pytest.raises(ValidationError, match=problem):
        model_spec(**VLLM, **fields)


def test_in_worker_engines_have_no_gpus_field():
    with pytest.raises(ValidationError, match="gpus"):
        model_spec(name="h", model="/m", engine="hf", gpus=[0])
