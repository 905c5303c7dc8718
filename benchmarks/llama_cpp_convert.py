"""llama.cpp's convert_hf_to_gguf.py for the demo models: `LLAMA_CPP=DIR python llama_cpp_convert.py ARGS...`.

The demo tokenizer is byte-level BPE with GPT-2's pre-tokenizer regex (its tokenizer.json says so), but
llama.cpp recognises a pre-tokenizer only by the hash of a known model's token ids, which a vocabulary
trained here cannot match: this tells the converter it is GPT-2's and runs it unchanged otherwise.
Real checkpoints need no wrapper; `surgery gguf --converter` takes this file only for the benchmark.
"""

import json
import os
import sys
from pathlib import Path

root = Path(os.environ["LLAMA_CPP"])
sys.path[:0] = [str(root), str(root / "gguf-py")]
from conversion.base import TextModel  # noqa: E402  (llama.cpp's own package, found through root)

_recognised = TextModel.get_vocab_base_pre


def _gpt2_for_the_demo(self, tokenizer) -> str:
    pre = json.loads((self.dir_model / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex"):
        return "gpt-2"
    return _recognised(self, tokenizer)


TextModel.get_vocab_base_pre = _gpt2_for_the_demo
sys.argv[0] = str(root / "convert_hf_to_gguf.py")
import convert_hf_to_gguf  # noqa: E402

convert_hf_to_gguf.main()
