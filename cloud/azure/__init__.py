"""The Azure driver on azure-mgmt-compute/-network: Arvados lib/cloud/azure behaviour."""
