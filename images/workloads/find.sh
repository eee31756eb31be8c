# Walk the root file system (busybox, perl, python and their libraries)
# and checksum every file, over and over.
while true; do
    find / -xdev -type f | sort | xargs md5sum > /tmp/md5.txt
    md5sum /tmp/md5.txt > /tmp/md5.sum
    sleep 1
done
