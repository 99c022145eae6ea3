#!/usr/bin/env bash
# Here, before a session's lent GPU run (ci/gpu/bench.sh): the Python packages the device machine
# lacks, as cp312 wheels (.whl/, 4.5 MiB), and the embedded model's tokenizer with its config but
# no weights (.gpu/smollm2-tokenizer/, 3.5 MiB: the 100 MB GGUF package would not travel).
# Both folders are git-ignored (.git/info/exclude); the run carries them: carry [".whl", ".gpu"].
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qsx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
grep -qsx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
rm -rf .whl .gpu && mkdir -p .whl/data .gpu
download() {
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pin() { grep -i "^$1==" ci/constraints.txt; }
# hwft's own needs the image lacks (KINDS.md's package list), at this project's pins; and Liger.
download -d .whl $(pin pydantic) $(pin pydantic_core) $(pin annotated-types) $(pin typing-inspection) liger-kernel==0.8.5
# datasets reads the tests' JSONL files; kept apart (.whl/data): the bench reads no file, and an
# import of it that fails on the image's versions must not break the Trainer arms, which import it
download -d .whl/data $(pin datasets) $(pin dill) $(pin multiprocess)
# The tokenizer the bench's token ids come from, as a model folder without weights.
.venv/bin/python - <<'PY'
import shutil
from pathlib import Path
from hwft.models import materialise, resolve_model
model = materialise(resolve_model("smollm2-135m"), log=lambda m: None)
out = Path(".gpu/smollm2-tokenizer")
out.mkdir(parents=True)
for f in model.iterdir():
    if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
        shutil.copy2(f, out / f.name)
PY
du -sh .whl .gpu
