"""A Llama checkpoint written as llama.cpp's converter writes a GGUF: q / k rows permuted per head, every tensor
in its own storage type (F32, F16, Q8_0, Q4_0, Q4_1). Shared by the GGUF tests (test_llm_layer.py) and the
fuzzing of GGUF files (test_bad_files.py)."""
from pathlib import Path

import torch

GGUF_TYPES = {  # ours -> (llama.cpp name, storage type)
    "input_layernorm.weight": ("attn_norm.weight", "F32"),
    "self_attn.q_proj.weight": ("attn_q.weight", "Q8_0"),
    "self_attn.k_proj.weight": ("attn_k.weight", "Q8_0"),
    "self_attn.v_proj.weight": ("attn_v.weight", "Q4_1"),
    "self_attn.o_proj.weight": ("attn_output.weight", "F16"),
    "post_attention_layernorm.weight": ("ffn_norm.weight", "F32"),
    "mlp.gate_proj.weight": ("ffn_gate.weight", "Q4_0"),
    "mlp.up_proj.weight": ("ffn_up.weight", "Q4_1"),
    "mlp.down_proj.weight": ("ffn_down.weight", "Q8_0"),
}


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to q / k rows: per head, interleave the halves."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def write_llama_gguf(stored: dict[str, torch.Tensor], config: dict, layers: int, path: Path) -> dict:
    """The first `layers` decoder layers of `stored` (a Hugging Face state_dict; `config` its config.json) as a
    GGUF at `path` -> {layer number: {our name: the weight as loading should give it back: quantised, then
    dequantised, in the HF layout}}. Quantisation blocks run along rows, so dequantising commutes with the
    row permutation."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    permuted_heads = {"self_attn.q_proj.weight": config["num_attention_heads"],
                      "self_attn.k_proj.weight": config["num_key_value_heads"]}
    expected = {}
    for i in range(layers):
        expected[i + 1] = {}
        for name, (gguf_name, kind) in GGUF_TYPES.items():
            weight = stored[f"model.layers.{i}.{name}"].float()
            heads = permuted_heads.get(name)
            on_disk = llama_cpp_permute(weight, heads) if heads else weight
            qtype = gguf.GGMLQuantizationType[kind]
            dtype = "float16" if kind == "F16" else "float32"
            writer.add_tensor(f"blk.{i}.{gguf_name}", gguf.quants.quantize(on_disk.numpy().astype(dtype), qtype),
                              raw_dtype=qtype)
            expected[i + 1][name] = torch.from_numpy(gguf.quants.dequantize(
                gguf.quants.quantize(weight.numpy().astype(dtype), qtype), qtype).astype("float32")).reshape(weight.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected
