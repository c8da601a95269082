"""The human-evaluation app (paper section 3.1): pairwise realism and caption-match votes."""
