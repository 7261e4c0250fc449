"""refseg: referring image segmentation at cluster scale."""
