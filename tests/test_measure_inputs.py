"""kvlib.measure.inputs: prompts in every form, strategy specs and their names."""

import torch

import kvlib
from kvlib.measure import prompt_ids, spec_label, split_spec


def test_every_form_of_prompt_gives_a_batch_of_ids():
    ids = kvlib.encode("The cache keeps")
    for prompt in ("The cache keeps", ids, torch.tensor(ids), torch.tensor([ids])):
        got = prompt_ids(prompt, "cpu")
        assert got.shape == (1, len(ids)) and got[0].tolist() == ids
    assert prompt_ids(torch.tensor([ids, ids])).shape == (2, len(ids))


def test_specs_and_their_names():
    assert split_spec(("sliding", 8)) == ("sliding", 8)
    assert split_spec("sliding", 16) == ("sliding", 16)
    assert split_spec("concat", 16) == ("concat", None)  # a window only where one is needed
    assert split_spec("sinks", 16) == ("sinks", 16)
    assert split_spec(None) == (None, None)
    assert [spec_label(s) for s in (None, "concat", ("sliding", 8))] == [
        "no cache", "concat", "sliding (window 8)"]
