"""Generation: requests, sampling, detokenization and the step loop over a model runner."""
