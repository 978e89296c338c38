"""The online input: tf.data pipelines over built clips, video and text masking, index streams, mixtures, QA inputs."""
