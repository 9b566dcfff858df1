"""Tracking: the MLflow store (where it is, locks), which run a result belongs to, logging records into runs,
secrets kept out of them, and promotion in the Model Registry. The only package that imports MLflow (with
depthtune.serving, the served model)."""
