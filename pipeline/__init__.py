"""Stage one: teacher-logit capture, and the dataset format both stages share."""
