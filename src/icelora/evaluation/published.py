"""Published numbers on another model (Llama-2-7B-chat), quoted for scale, never mixed with ours."""

from __future__ import annotations

from typing import Any

_COLUMNS = ["edit succ.", "portability", "locality", "fluency"]
_IN_CONTEXT = "in-context (KnowEdit's \"ICE\")"

#: KnowEdit (Zhang et al., arXiv 2401.01286) on Llama-2-7b-chat, as listed verbatim in
#: zjunlp/EasyEdit examples/KnowEdit.md (commit 1462f58b0689cdf92010fece34ffa11fa173b576),
#: accuracies x100, fluency x100 bits.
PUBLISHED_KNOWEDIT_LLAMA2: dict[str, Any] = {
    "columns": _COLUMNS,
    "rows": [(dataset, method, values) for dataset, table in (
        ("WikiData_recent", [("FT-L", ["55.75", "40.86", "43.70", "529.24"]),
                             ("FT-M", ["100.00", "65.44", "64.33", "574.32"]),
                             ("AdaLoRA", ["100.00", "64.69", "56.42", "579.57"]),
                             ("ROME", ["97.18", "55.25", "54.77", "579.66"]),
                             ("MEMIT", ["97.05", "56.37", "52.15", "573.89"]),
                             (_IN_CONTEXT, ["60.74", "36.93", "33.34", "531.01"])]),
        ("ZsRE", [("FT-L", ["53.93", "45.64", "73.42", "493.01"]),
                  ("FT-M", ["99.98", "60.31", "89.78", "552.26"]),
                  ("AdaLoRA", ["100.00", "58.03", "75.76", "563.56"]),
                  ("ROME", ["96.77", "52.63", "53.67", "573.75"]),
                  ("MEMIT", ["95.37", "52.67", "48.32", "563.31"]),
                  (_IN_CONTEXT, ["66.01", "63.94", "23.14", "541.14"])]),
    ) for method, values in table],
    "source": "KnowEdit, Zhang et al. 2024 (arXiv 2401.01286), Llama-2-7b-chat; zjunlp/EasyEdit "
              "examples/KnowEdit.md at commit 1462f58. Accuracies x100, fluency x100.",
    "note": (
        "**Another model, another setting: Llama-2-7b-chat, not SmolLM2-135M. Quoted for scale only.** "
        "These are the KnowEdit benchmark's published numbers (Zhang et al. 2024, arXiv 2401.01286, as "
        "listed in zjunlp/EasyEdit `examples/KnowEdit.md` at commit 1462f58), accuracies and fluency x100 "
        "as published (our tables use [0, 1] and bits). KnowEdit's column named \"ICE\" is plain in-context "
        "editing (the fact in the prompt), not the ICE training method of Qi et al. The ICE paper's own "
        "results table (Qi et al., arXiv 2406.11194, Llama-2-7b-chat, ICE against ROME, MEMIT, FT-L and "
        "FT-M, with PPL_r) is not reproduced here: it could not be read on the machine that wrote this "
        "report (the reference repository publishes it as images), and no number is copied second-hand."
    ),
}
