"""Layer-by-layer streaming reproduces the unmodified transformers model, for every architecture."""

import pytest
import torch

from conftest import ARCHITECTURES
from kbvq_cli.model_files import ModelSource
from kbvq_cli.streaming import LayerStreamer


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_streamed_layers_match_full_model(model_type, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    directory = tiny_model_dir(model_type)
    source = ModelSource(str(directory))
    streamer = LayerStreamer(source, "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    input_ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids, output_hidden_states=True).hidden_states
        hidden = streamer.embed(input_ids)
        for index in range(source.num_layers - 1):  # the last hidden state is after the final norm
            layer = streamer.build_layer(index)
            hidden = layer(hidden, **streamer.layer_kwargs(index, hidden))
            torch.testing.assert_close(hidden, expected[index + 1], rtol=1e-5, atol=1e-6)


def test_moe_layers_are_found(tiny_model_dir):
    source = ModelSource(str(tiny_model_dir("deepseek_v2")))
    streamer = LayerStreamer(source, "cpu")
    flags = [streamer.is_moe_layer(streamer.build_layer(i)) for i in range(source.num_layers)]
    assert flags == [False, True, True]  # first_k_dense_replace=1
