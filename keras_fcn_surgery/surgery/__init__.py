"""The surgery: plan, convert and verify a classifier as a fully convolutional network (rules/ holds the head rules)."""
