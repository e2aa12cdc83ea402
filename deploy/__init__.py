"""Server-side purification: DHBE as a Ray Train job, and the hook that plugs it into a Flower run."""
