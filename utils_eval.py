"""Compatibility module: the evaluation code lives in the `evaluation/` package (one module per concern).

Scripts and notebooks that import from `utils_eval` keep working; new code should import from the
package (see evaluation/__init__.py for the map). Model-written code runs only through
`evaluation.sandbox` (kernel-confined; see its docstring for the threat model).
"""
from evaluation.cl_metrics import _as_matrix, aggregate, cl_metrics, drift_delta, summarize  # noqa: F401
from evaluation.code_score import (codeio_harness, extract_code, humaneval_completion, humaneval_harness,  # noqa: F401
                                   humaneval_program, pass_at_k, score_codeio, score_humaneval)
from evaluation.drift import (DRIFT_PROMPTS, base_drift_responses, drift_metrics, drift_probe_rows,  # noqa: F401
                              kl_to_base)
from evaluation.general_score import score_general  # noqa: F401
from evaluation.generation import generate, generate_ids, load_bench_sets  # noqa: F401
from evaluation.math_score import (extract_math_flexible, extract_math_strict, math_reference_answer,  # noqa: F401
                                   normalize_number, numbers_equal, score_math)
from evaluation.safety_score import (OVERREFUSAL_PREFIXES, REFUSAL_SUBSTRINGS, SUPPORT_MARKERS,  # noqa: F401
                                     is_over_refusal, is_refusal, is_supportive, score_safety)
from evaluation.sandbox import (REPO_DIR, SandboxResult, SandboxUnavailable, run_check, run_sandboxed,  # noqa: F401
                                sandbox_execute)
from evaluation.scoring import STAGE_METRICS, TOOL_KINDS, score_row, score_rows  # noqa: F401
from evaluation.stage import run_stage_metrics  # noqa: F401
from evaluation.style import has_code_fence, has_markdown, is_json_output  # noqa: F401
from evaluation.tool_score import BFCL_TYPES, bfcl_ast_match, bfcl_normalize, parse_tool_calls, score_tool  # noqa: F401
