//! Load generator for the appliance's HTTP services.
