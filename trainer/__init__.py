"""Stage two: stream a logit dataset into a student."""
