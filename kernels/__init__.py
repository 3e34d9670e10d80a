"""msrec_dist package."""
