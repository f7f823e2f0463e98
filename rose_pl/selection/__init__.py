"""Selection: influence scores (ROSE Eq. 7), baselines, the registry of selection methods, top-k selection and
the selection report."""
