"""Networks: the host side of NICs. Pure parts (names, models, dnsmasq argv, nftables rules,
the guest's network configuration) and I/O parts (links, dnsmasq, nft, the store, the
network manager).

A managed network is a Linux bridge with the first address of its subnet, one dnsmasq
(DHCP in the upper half of the subnet, DNS; leases in ``DATA/networks/NAME/leases``) and,
for ``nat`` and ``isolated`` networks, one nftables table of its own. Static addresses live in
the lower half. A VM's NICs on it are taps that vmforge creates under the VM's lock before the
hypervisor starts and removes whenever the VM is not live (stop, crash, kill, rm, a failed
start, or the next command after a vmforge that died).

Importing this package imports nothing: modules are imported where used.
"""
