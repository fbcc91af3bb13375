"""rclpy nodes around robotrl's robot side (real/, firmware_bridge/; sim/ only in firmware_node)."""
