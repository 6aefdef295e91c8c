"""The job contract: what a comparison job is, how it expands into runs, where its files may live."""
