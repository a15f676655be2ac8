"""Evaluation: scorers per task family, the code sandbox, generation, drift and continual-learning metrics.

  sandbox        kernel-confined execution of model-written code (bubblewrap + seccomp + rlimits)
  math_score     T2 gsm8k strict / flexible extraction
  code_score     T3 HumanEval and codeio, verdicts from two sandboxes (evaluation.sandbox.run_check)
  tool_score     T4 BFCL AST match, JSON validity, exact match
  safety_score   T5 refusal, over-refusal, supportive replies
  general_score  T1 program-checkable instructions (IFEval style)
  style          format flags for drift (JSON, markdown, code fences)
  cl_metrics     aggregation and AP / BWT / FWT / forgetting
  generation     bench rows and batched greedy generation
  scoring        one generated row -> its metric values
  format_score   the reply's form per task (superficial forgetting), apart from its content
  knowledge      likelihood rank of the gold answer among distractors (no generation, no answer format)
  drift          KL to the base model (all reply tokens, the first few, the rest) and format drift on benign probes
  recovery       after the last stage: a few steps on each earlier task, then re-score (spurious-forgetting share)
  stage          one stage's metrics, logged as JSONL with n and standard errors

Import order is one-way: utils_io <- utils_data <- utils_forward <- evaluation.* <- utils_train <- scripts.
"""
